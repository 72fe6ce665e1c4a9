"""The manifest: its format, how it is built from a method's integer weights, stored, loaded and
validated, and every weight scheme's rules. The only seam between the methods and the back ends:
it imports no method, and a tool that reads manifests needs nothing else of ptq.

The names below load on first use, so reading a manifest's header (`store.read_data`, what
`ptq card` needs) does not pay for torch, which validation's shape dry run needs."""
from typing import Any

__all__ = ["FORMAT", "MANIFEST_FILE", "Manifest", "SCHEMES", "TENSOR_FILE", "VERSION", "dumps", "load", "point_bits",
           "save", "sha256_file", "validate", "weight_summary"]


def __getattr__(name: str) -> Any:
    if name in ("FORMAT", "MANIFEST_FILE", "TENSOR_FILE", "VERSION", "Manifest", "dumps"):
        from . import format
        return getattr(format, name)
    if name in ("SCHEMES", "point_bits"):
        from . import schemes
        return getattr(schemes, name)
    if name in ("load", "save", "sha256_file"):
        from . import store
        return getattr(store, name)
    if name == "weight_summary":
        from .summary import weight_summary
        return weight_summary
    if name == "validate":
        from .validation import validate
        return validate
    raise AttributeError(f"module 'ptq.manifest' has no attribute {name!r}")
