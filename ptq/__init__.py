"""ptq: post-training quantization with a verified integer manifest.

The API is imported lazily: `import ptq.manifest` (a tool that only reads manifests) or
`import ptq.calib` does not pay for torch.export, cvxpy or onnx. The layers and what each may
import are in docs/ARCHITECTURE.md.
"""
from typing import Any

from .version import __version__

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
