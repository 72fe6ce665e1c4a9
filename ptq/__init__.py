"""ptq: post-training quantization with a verified integer manifest."""
__version__ = "0.1.0"

from .api import QuantizedModel, load, quantize  # noqa: E402
from .errors import PtqError  # noqa: E402

__all__ = ["PtqError", "QuantizedModel", "load", "quantize", "__version__"]
