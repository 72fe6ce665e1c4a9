"""The mixed-precision manifest in memory: the JSON document and the tensors its references name.

The manifest is the only interface between the methods and the back ends. JSON is written with
sorted keys (and, by `store`, tensors in a fixed order), so the same inputs and seed give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ManifestError

if TYPE_CHECKING:
    from ..ir import Graph

FORMAT = "ptq-manifest"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "tensors.safetensors"


def dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=1, allow_nan=False) + "\n"


@dataclass
class Manifest:
    """In memory: the JSON document and the tensors its `ref` strings name."""

    data: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    # -- access --
    @property
    def graph(self) -> dict:
        return self.data["graph"]

    @property
    def ops(self) -> list[dict]:
        return self.data["graph"]["ops"]

    def encoding(self, tensor: str) -> dict:
        return self.graph["encodings"][tensor]

    def tensor(self, ref: str) -> np.ndarray:
        try:
            return self.tensors[ref]
        except KeyError:
            raise ManifestError(f"manifest refers to tensor '{ref}', which is not in {TENSOR_FILE}") from None

    def put(self, ref: str, array: np.ndarray) -> str:
        self.tensors[ref] = np.ascontiguousarray(array)
        return ref

    def weighted_ops(self) -> list[dict]:
        return [op for op in self.ops if "weight" in op]

    def to_graph(self) -> "Graph":
        """The manifest's graph as IR ops (each carrying its record) for the executors."""
        from ..ir import Graph, Op

        g = self.graph
        ops = [Op(name=r["name"], kind=r["kind"], inputs=list(r["inputs"]), output=r["output"],
                  attrs=r["attrs"], record=r) for r in g["ops"]]
        return Graph(input=g["input"], input_shape=tuple(g["input_shape"]), ops=ops, outputs=list(g["outputs"]))

    def hash(self) -> str:
        """Digest of the JSON document (which includes the tensor file's hash once saved)."""
        return hashlib.sha256(dumps(self.data).encode()).hexdigest()
