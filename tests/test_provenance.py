"""Code fingerprints: which stage's fingerprint a code change moves (on a copy of the package)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pipeline import provenance
from pipeline.cli import COMMANDS
from pipeline.hashing import file_sha256
from pipeline.provenance import code_fingerprint, command_files

STAGES = ["tile", "extract", "splits", "train", "evaluate", "summarize-metrics", "plot-roc", "heatmaps",
          "manifest", "summarize-tiles", "demo-cohort"]


@pytest.fixture
def pkg(tmp_path) -> Path:
    """A private copy of the package, to edit."""
    dst = tmp_path / "pipeline"
    shutil.copytree(Path(provenance.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def fingerprints(root: Path) -> dict[str, str]:
    return {c: code_fingerprint(c, root=root) for c in STAGES}


def changed(before: dict[str, str], root: Path) -> set[str]:
    after = fingerprints(root)
    return {c for c in STAGES if after[c] != before[c]}


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_stage_moves_only_with_its_own_code(pkg):
    base = fingerprints(pkg)
    assert len(set(base.values())) == len(STAGES)  # every command has its own code
    append(pkg / "features" / "encoders.py", "\n_EDITED = 1\n")  # extraction code
    assert changed(base, pkg) == {"extract"}
    append(pkg / "mil" / "train.py", "\n_EDITED = 1\n")  # training code: training and evaluation
    assert changed(base, pkg) == {"extract", "train", "evaluate"}
    append(pkg / "tiling" / "tissue.py", "\n_EDITED = 1\n")  # imported lazily inside tiling.tile_slide
    assert "tile" in changed(base, pkg)


def test_comments_and_formatting_do_not_count(pkg):
    base = fingerprints(pkg)
    src = (pkg / "tiling" / "grid.py").read_text()
    (pkg / "tiling" / "grid.py").write_text("# a comment\n" + src.replace("\n\n\n", "\n\n\n\n") + "\n# trailing\n")
    assert changed(base, pkg) == set()


def test_the_command_function_in_cli_counts(pkg):
    """Editing the `train` command's function (not another command's) moves only `train`."""
    base = fingerprints(pkg)
    cli = pkg / "cli" / "mil.py"
    src = cli.read_text()
    anchor = '    """Train one model on one fold'
    assert anchor in src
    cli.write_text(src.replace(anchor, "    _edited = 1\n" + anchor, 1))
    assert changed(base, pkg) == {"train"}


def test_a_cli_helper_moves_the_commands_that_call_it(pkg):
    """A helper of another cli module (`cli/args.py`) counts for every command calling it, in
    whichever module; editing a cli module outside any command's functions moves nothing."""
    base = {c: code_fingerprint(c, root=pkg) for c in COMMANDS}
    args = pkg / "cli" / "args.py"
    src = args.read_text()
    anchor = '    return [v for v in csv.split(",") if v]'
    assert anchor in src
    args.write_text(src.replace(anchor, "    _edited = 1\n" + anchor, 1))
    assert {c for c in COMMANDS if code_fingerprint(c, root=pkg) != base[c]} == {"tile", "pretrain", "evaluate-lesions"}
    base = {c: code_fingerprint(c, root=pkg) for c in COMMANDS}
    append(args, "\n\ndef _unused(x):\n    return x\n")
    append(pkg / "cli" / "__init__.py", "\n\n_EDITED = 1\n")
    assert {c for c in COMMANDS if code_fingerprint(c, root=pkg) != base[c]} == set()
    for c in COMMANDS:  # the cli package is hashed by function, never as files
        assert not [p for p in command_files(c, root=pkg) if p.parent == pkg / "cli"], c


def test_cli_imports_are_followed(pkg):
    """Helpers reached by a relative import or as `module.helper`, and the pipeline modules a cli
    module imports at its top level, count for that module's commands only."""
    cli = pkg / "cli"
    (cli / "extra.py").write_text("def _helper():\n    return 1\n\n\ndef _other():\n    return 2\n")
    (pkg / "newmod.py").write_text("X = 1\n")
    for name, line in (("mil.py", "from . import extra\n"), ("tiling.py", "from .extra import _other as _o\n"),
                       ("deploy.py", "import pipeline.newmod  # noqa: F401\n")):
        src = (cli / name).read_text()
        (cli / name).write_text(src.replace("\nimport argparse\n", f"\nimport argparse\n{line}", 1))
    for name, anchor, call in (("mil.py", '    """Patient-level stratified folds', "    extra._helper()\n"),
                               ("tiling.py", '    """Tables of tiles per slide', "    _o()\n")):
        src = (cli / name).read_text()
        assert anchor in src
        (cli / name).write_text(src.replace(anchor, call + anchor, 1))
    base = {c: code_fingerprint(c, root=pkg) for c in COMMANDS}
    (cli / "extra.py").write_text("def _helper():\n    return 3\n\n\ndef _other():\n    return 4\n")
    assert {c for c in COMMANDS if code_fingerprint(c, root=pkg) != base[c]} == {"splits", "summarize-tiles"}
    base = {c: code_fingerprint(c, root=pkg) for c in COMMANDS}
    append(pkg / "newmod.py", "Y = 2\n")
    assert {c for c in COMMANDS if code_fingerprint(c, root=pkg) != base[c]} == {"predict", "summarize-predictions"}


def test_new_modules_and_relative_imports_are_followed(pkg):
    """A new subpackage reached by a lazy, relative import joins the stage that imports it."""
    (pkg / "newpkg").mkdir()
    (pkg / "newpkg" / "__init__.py").write_text("")
    (pkg / "newpkg" / "a.py").write_text("from .b import X\n")
    (pkg / "newpkg" / "b.py").write_text("X = 1\n")
    append(pkg / "mil" / "splits.py", "\n\ndef _later():\n    from pipeline.newpkg import a\n    return a\n")
    files = {p.relative_to(pkg).as_posix() for p in command_files("splits", root=pkg)}
    assert {"newpkg/__init__.py", "newpkg/a.py", "newpkg/b.py", "mil/splits.py", "__init__.py"} <= files
    base = fingerprints(pkg)
    append(pkg / "newpkg" / "b.py", "Y = 2\n")
    assert changed(base, pkg) == {"splits", "train", "evaluate"}  # train and evaluate read the splits too


def test_unknown_command_is_an_error():
    with pytest.raises(KeyError, match="no CLI command 'nope'"):
        code_fingerprint("nope")


def test_fingerprints_never_import_what_they_hash():
    """Computed in the Snakemake process: reading files must not import torch (or the stages)."""
    code = ("import sys; from pipeline.provenance import code_fingerprint as f; "
            f"[f(c) for c in {STAGES!r}]; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pipeline.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['pipeline.provenance']", r.stdout


def test_file_sha256(tmp_path):
    data = bytes(range(256)) * 9000  # spans several 1 MiB chunks
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_tile_fingerprint_covers_every_slide_reader():
    """The readers are imported by name in the factory's registry, so every one is in the
    fingerprint of the stages that open slides (a lazy, string-named import would not be)."""
    pkg = Path(provenance.__file__).parent
    readers = {p.relative_to(pkg).as_posix() for p in (pkg / "slides").glob("*.py")
               if p.name not in ("sheet.py", "annotations.py")}  # the sheet and annotations are not readers
    for command in ("tile", "extract", "heatmaps"):
        files = {p.relative_to(pkg).as_posix() for p in command_files(command)}
        assert readers <= files, (command, readers - files)


def test_the_fingerprinting_code_is_no_stage_code():
    """Changing how code is fingerprinted reruns nothing: provenance.py is in no command's files."""
    pkg = Path(provenance.__file__).parent
    for command in COMMANDS:
        assert pkg / "provenance.py" not in command_files(command), command
