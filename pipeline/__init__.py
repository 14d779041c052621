"""Multi-magnification whole-slide-image classification pipeline (tiling, features, M2OTCA)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m2otca-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+src"
