"""The primitives every manifest check is written with: one ManifestError that names the field."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ManifestError
from .format import Manifest


def fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"manifest field '{where}': {msg}")


JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
              bool: "true or false", type(None): "null"}


def need(obj: Any, key: str, kind: type | tuple, where: str) -> Any:
    """obj[key], which must exist and be of `kind` (bool is never taken for an int)."""
    path = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise fail(path, "is missing")
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise fail(path, f"must be {want}, got {JSON_NAMES.get(type(v), type(v).__name__)}")
    return v


def tensor(m: Manifest, ref: Any, where: str, dtype_kind: str | None = None, shape: tuple | None = None) -> np.ndarray:
    if not isinstance(ref, str):
        raise fail(where, "must be a tensor reference (string)")
    if ref not in m.tensors:
        raise fail(where, f"refers to tensor '{ref}', which is not in the tensor file")
    a = m.tensors[ref]
    if dtype_kind == "int" and not np.issubdtype(a.dtype, np.integer):
        raise fail(where, f"tensor '{ref}' must be integer, is {a.dtype}")
    if dtype_kind == "float" and not np.issubdtype(a.dtype, np.floating):
        raise fail(where, f"tensor '{ref}' must be floating point, is {a.dtype}")
    if dtype_kind == "float" and not np.all(np.isfinite(a)):
        raise fail(where, f"tensor '{ref}' contains NaN or Inf")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise fail(where, f"tensor '{ref}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def in_range(a: np.ndarray, lo: int, hi: int, where: str) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        raise fail(where, f"values {int(a.min())}..{int(a.max())} fall outside [{lo}, {hi}]")
