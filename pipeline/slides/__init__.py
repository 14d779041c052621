"""Reading slides: one module per backend behind one factory.

- `factory`: `open_slide(path, mpp=None)` and `READERS`, the readers in the order they are tried;
- `base`: `Slide` (tiles at any µm/px, thumbnails) and `SlideInfo`, what every reader returns;
- `dicom`, `openslide_reader`, `tiff_reader`: the readers;
- `mpp`: the scan resolution from metadata; `checks`: damaged, non-brightfield or forged files
  refused before reading; `files`: a slide's files and their fingerprint.
"""

from pipeline.slides.base import Slide, SlideInfo
from pipeline.slides.factory import READERS, open_slide
from pipeline.slides.files import fingerprint, fingerprint_matches, slide_files
from pipeline.slides.mpp import resolve_mpp

__all__ = ["READERS", "Slide", "SlideInfo", "fingerprint", "fingerprint_matches", "open_slide", "resolve_mpp",
           "slide_files"]
