"""The graph IR: captured ops in topological order, the op table, the float semantics of each op,
and the per-layer quantized weights a method produces. Imports nothing of ptq but the foundation
modules (errors, intmath)."""
from .graph import Graph, Kernel, Op, execute, is_depthwise
from .ops import LUT_FUNCTIONS, OP_KINDS, OP_TABLE, OpKind, require_all
from .weights import LayerWeights, WeightQuant

__all__ = ["Graph", "Kernel", "LUT_FUNCTIONS", "LayerWeights", "OP_KINDS", "OP_TABLE", "Op", "OpKind", "WeightQuant",
           "execute", "is_depthwise", "require_all"]
