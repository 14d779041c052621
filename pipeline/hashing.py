"""sha256 of a file, torch-free (the Snakemake process names encoder weights by it).

Apart from `provenance`, so that a change in how code is fingerprinted does not change the
fingerprint of every stage that hashes a file (extraction, pretraining, prediction).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (encoder weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
