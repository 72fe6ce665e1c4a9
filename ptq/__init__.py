"""ptq: post-training quantization with a verified integer manifest.

The API is imported lazily so that `calib` (which raises ptq's errors) and `ptq` can import each
other's leaf modules without a cycle.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["PtqError", "QuantizedModel", "load", "quantize", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("QuantizedModel", "load", "quantize"):
        from . import api
        return getattr(api, name)
    if name == "PtqError":
        from .errors import PtqError
        return PtqError
    if name == "errors":
        from . import errors
        return errors
    raise AttributeError(f"module 'ptq' has no attribute {name!r}")
