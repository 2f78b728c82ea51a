"""tformer: tokenize text, train Transformers, generate from them, and inspect their attention."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tformer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from tformer.config import PRESETS, ModelConfig
from tformer.errors import TformerError

__all__ = ["__version__", "ModelConfig", "PRESETS", "TformerError"]
