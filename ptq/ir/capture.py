"""Capture a PyTorch model into the graph IR with torch.export, folding BatchNorm and fusing clamps.

Each ATen op maps to one IR op (or to nothing, for identities such as dropout in eval mode).
An op outside the integer op set is refused with an error naming the op and its module.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ModelError, UnsupportedOpError, first_line
from .attention import explicit_attention
from .graph import Graph, Op
from .ops import LUT_FUNCTIONS, REQUANT_KINDS

aten = torch.ops.aten

IDENTITY_TARGETS = {aten.dropout.default, aten.clone.default, aten.contiguous.default,
                    aten.alias.default, aten.detach.default, aten.feature_dropout.default,
                    aten.to.dtype, aten._to_copy.default}  # casts: codes of integer-valued tensors (token ids) are exact
IGNORED_TARGETS = {aten._assert_tensor_metadata.default}
RESHAPE_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                   aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
CLAMP_TARGETS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                 aten.clamp.default, aten.clamp_.default, aten.relu6.default}
ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor}
LUT_TARGETS = {getattr(aten, n).default: n for n in LUT_FUNCTIONS}
LUT_TARGETS.update({getattr(aten, n + "_").default: n for n in LUT_FUNCTIONS if hasattr(aten, n + "_")})
MATMUL_TARGETS = {aten.matmul.default, aten.bmm.default}
SCALE_TARGETS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
PERMUTE_TARGETS = {aten.transpose.int, aten.permute.default}
SPLIT_TARGETS = {aten.split.Tensor, aten.split_with_sizes.default}
SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default}


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape)


def _pair(v: Any, n: int = 2) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = [int(i) for i in v]
    return v * n if len(v) == 1 else v


class _Capture:
    """Walks the exported graph once, turning nodes into IR ops."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        sig = ep.graph_signature
        self.params: dict[str, str] = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.constants = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        self.ops: list[Op] = []
        self.alias: dict[str, str] = {}  # node name -> tensor name
        self.names: set[str] = set()
        self.n_consumers: dict[str, int] = {}
        self.splits: dict[str, tuple[torch.fx.Node, int, list[int]]] = {}  # split node -> (input, dim, piece starts)
        self.dropped: dict[str, str] = {}  # `mask == 0` node -> the mask tensor
        self.masked: dict[str, tuple[str, str]] = {}  # scores.masked_fill(mask == 0, -inf) node -> (scores, mask)
        self.broadcast: dict[str, np.ndarray] = {}  # parameter.expand(batch, ...) node -> the parameter (batch dim 1)

    # -- helpers --
    def tensor(self, node: Any) -> str:
        if not isinstance(node, torch.fx.Node) or node.name not in self.alias:
            raise UnsupportedOpError(f"an op input is not an activation tensor: {node!r}")
        return self.alias[node.name]

    def param(self, node: Any) -> tuple[str, np.ndarray] | tuple[None, None]:
        if node is None:
            return None, None
        if not isinstance(node, torch.fx.Node):
            raise UnsupportedOpError(f"expected a parameter, got {node!r}")
        fqn = self.params.get(node.name) or self.constants.get(node.name)
        if fqn is None:
            raise UnsupportedOpError(f"weights computed at run time are not supported ({node.name})")
        src = self.ep.state_dict if fqn in self.ep.state_dict else self.ep.constants
        return fqn, src[fqn].detach().to(torch.float64).cpu().numpy()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}#{i}"
        self.names.add(name)
        return name

    def producer(self, tensor: str) -> Op | None:
        for op in reversed(self.ops):
            if op.output == tensor:
                return op
        return None

    def emit(self, node: torch.fx.Node, kind: str, inputs: list[str], name: str, **attrs) -> Op:
        op = Op(name=self.unique(name), kind=kind, inputs=inputs, output=node.name, attrs=attrs)
        op.attrs["out_shape"] = list(_shape(node)[1:])
        self.ops.append(op)
        self.alias[node.name] = node.name
        return op

    def step(self, name: str, kind: str, inputs: list[str], output: str, out_shape: list[int], **attrs) -> str:
        """An op of its own inside one ATen node's decomposition (its output is an internal tensor)."""
        self.ops.append(Op(name=self.unique(name), kind=kind, inputs=inputs, output=output,
                           attrs={**attrs, "out_shape": list(out_shape)}))
        return output

    def constant(self, node: Any) -> np.ndarray | None:
        """The value of a constant operand (a parameter, buffer or lifted constant, or one expanded
        over the batch, then with its batch dimension of 1), or None for an activation."""
        if isinstance(node, torch.fx.Node) and node.name in self.broadcast:
            return self.broadcast[node.name]
        if isinstance(node, torch.fx.Node) and (node.name in self.params or node.name in self.constants):
            return self.param(node)[1]
        return None

    # -- op handlers --
    def weighted(self, node, kind):
        args = list(node.args)
        x = self.tensor(args[0])
        fqn, w = self.param(args[1])
        _, b = self.param(args[2] if len(args) > 2 else node.kwargs.get("bias"))
        name = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn[: -len("_weight")] if fqn.endswith("_weight") else fqn
        if kind == "conv":
            if w.ndim != 4:
                raise UnsupportedOpError(f"only 2-D convolutions are supported ({name})")
            padding = args[4] if len(args) > 4 else 0
            if isinstance(padding, str):
                raise UnsupportedOpError(f"string padding {padding!r} is not supported ({name})")
            attrs = dict(stride=_pair(args[3] if len(args) > 3 else 1), padding=_pair(padding),
                         dilation=_pair(args[5] if len(args) > 5 else 1),
                         groups=int(args[6]) if len(args) > 6 else 1)
            out = _shape(node)
            attrs["macs"] = int(w.shape[0] * np.prod(w.shape[1:]) * out[2] * out[3])
        else:
            # on (N, ..., K) inputs every leading position (a token) is one matrix-vector product
            attrs = {"macs": int(w.shape[0] * w.shape[1] * math.prod(_shape(args[0])[1:-1]))}
        op = self.emit(node, kind, [x], name, **attrs)
        op.weight = w
        op.bias = b if b is not None else np.zeros(w.shape[0])
        return op

    def batch_norm(self, node):
        args = list(node.args)
        x = self.tensor(args[0])
        _, gamma = self.param(args[1])
        _, beta = self.param(args[2])
        _, mean = self.param(args[3])
        _, var = self.param(args[4])
        eps = float(args[7] if node.target == aten.batch_norm.default else args[6])
        c = mean.shape[0]
        gamma = np.ones(c) if gamma is None else gamma
        beta = np.zeros(c) if beta is None else beta
        inv = gamma / np.sqrt(var + eps)
        prod = self.producer(x)
        if prod is not None and prod.kind == "conv" and self.n_consumers.get(x, 0) == 1 \
                and prod.attrs.get("act") is None:
            prod.weight = prod.weight * inv.reshape(-1, *([1] * (prod.weight.ndim - 1)))
            prod.bias = (prod.bias - mean) * inv + beta
            prod.attrs["bn_folded"] = True
            self.alias[node.name] = x
            return
        # A lone BatchNorm becomes a depthwise 1x1 convolution.
        op = self.emit(node, "conv", [x], _module_path(node) or node.name, stride=[1, 1],
                       padding=[0, 0], dilation=[1, 1], groups=c)
        out = _shape(node)
        op.attrs["macs"] = int(c * out[2] * out[3])
        op.weight = inv.reshape(c, 1, 1, 1)
        op.bias = beta - mean * inv

    def clamp(self, node):
        x = self.tensor(node.args[0])
        t = node.target
        if t in (aten.relu.default, aten.relu_.default):
            lo, hi = 0.0, None
        elif t == aten.relu6.default:
            lo, hi = 0.0, 6.0
        elif t in (aten.hardtanh.default, aten.hardtanh_.default):
            lo = float(node.args[1]) if len(node.args) > 1 else -1.0
            hi = float(node.args[2]) if len(node.args) > 2 else 1.0
        else:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
        prod = self.producer(x)
        if prod is not None and prod.kind in REQUANT_KINDS and prod.kind != "lut" \
                and self.n_consumers.get(x, 0) == 1 and prod.attrs.get("act") is None:
            prod.attrs["act"] = [lo, hi]
            prod.output = node.name
            self.alias[node.name] = node.name
            return
        self.emit(node, "clamp", [x], (_module_path(node) or node.name), act=[lo, hi])

    def handle(self, node: torch.fx.Node):
        t = node.target
        a = node.args
        mod = _module_path(node)
        if t == aten.conv2d.default or t == aten.convolution.default:
            if t == aten.convolution.default and (a[6] or any(a[7])):
                raise UnsupportedOpError(f"transposed convolution is not supported ({mod})")
            if t == aten.convolution.default:
                node.args = (a[0], a[1], a[2], a[3], a[4], a[5], a[8])
            self.weighted(node, "conv")
        elif t == aten.linear.default:
            self.weighted(node, "linear")
        elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            self.batch_norm(node)
        elif t == operator.getitem and a[0].name in self.splits:
            src, dim, starts = self.splits[a[0].name]
            i = int(a[1])
            self.emit(node, "slice", [self.tensor(src)], f"{mod or 'split'}:split{i}", dim=dim,
                      start=starts[i], end=starts[i + 1], step=1)
        elif t == operator.getitem:
            if a[1] != 0:
                raise UnsupportedOpError(f"tuple output {a[1]} of {a[0].target} is not supported ({mod})")
            self.alias[node.name] = self.alias[a[0].name]
        elif t in CLAMP_TARGETS:
            self.clamp(node)
        elif t in ADD_TARGETS and self.constant_add(node, mod):
            pass
        elif t in ADD_TARGETS:
            if not (isinstance(a[1], torch.fx.Node)) or (len(a) > 2 and a[2] != 1) or node.kwargs.get("alpha", 1) != 1:
                raise UnsupportedOpError(f"add with a constant or alpha is not supported ({mod})")
            self.emit(node, "add", [self.tensor(a[0]), self.tensor(a[1])], (mod or "add") + ":add")
        elif t == aten.max_pool2d.default:
            k = _pair(a[1])
            self.emit(node, "maxpool", [self.tensor(a[0])], mod or "maxpool", kernel=k,
                      stride=_pair(a[2]) if len(a) > 2 and a[2] else k,
                      padding=_pair(a[3]) if len(a) > 3 else [0, 0],
                      dilation=_pair(a[4]) if len(a) > 4 else [1, 1],
                      ceil_mode=bool(a[5]) if len(a) > 5 else False)
        elif t == aten.avg_pool2d.default:
            k = _pair(a[1])
            if (len(a) > 4 and a[4]) or (len(a) > 5 and not a[5]) or (len(a) > 6 and a[6] is not None):
                raise UnsupportedOpError(f"avg_pool2d with ceil_mode, count_include_pad=False or a divisor is not supported ({mod})")
            self.emit(node, "avgpool", [self.tensor(a[0])], mod or "avgpool", kernel=k,
                      stride=_pair(a[2]) if len(a) > 2 and a[2] else k,
                      padding=_pair(a[3]) if len(a) > 3 else [0, 0])
        elif t == aten.adaptive_avg_pool2d.default or t == aten.mean.dim:
            self.mean(node, mod)
        elif t in RESHAPE_TARGETS:
            in_shape, out_shape = _shape(a[0]), _shape(node)
            if not in_shape or not out_shape or in_shape[0] != out_shape[0]:
                raise UnsupportedOpError(f"{t} changes the batch dimension ({mod})")
            self.emit(node, "reshape", [self.tensor(a[0])], (mod or "reshape") + ":reshape",
                      shape=list(out_shape[1:]))
        elif t == aten.cat.default:
            dim = int(a[1]) if len(a) > 1 else 0
            rank = len(_shape(node))
            dim = dim % rank
            if dim == 0:
                raise UnsupportedOpError(f"concatenation along the batch dimension is not supported ({mod})")
            if any(self.constant(x) is not None for x in a[0]):
                self.constant_rows(node, dim, mod)
            else:
                self.emit(node, "concat", [self.tensor(x) for x in a[0]], (mod or "cat") + ":cat", dim=dim)
        elif t == aten.expand.default:
            self.expand(node, mod)
        elif t == aten.scaled_dot_product_attention.default:
            self.attention(node, mod)
        elif t in (aten.pad.default, aten.constant_pad_nd.default):
            mode = a[2] if t == aten.pad.default and len(a) > 2 else "constant"
            if mode != "constant":
                raise UnsupportedOpError(f"pad mode {mode!r} is not supported ({mod})")
            value = a[3] if t == aten.pad.default and len(a) > 3 else (a[2] if t == aten.constant_pad_nd.default and len(a) > 2 else 0.0)
            self.emit(node, "pad", [self.tensor(a[0])], (mod or "pad") + ":pad",
                      pads=[int(p) for p in a[1]], value=float(value or 0.0))
        elif t in IDENTITY_TARGETS:
            self.alias[node.name] = self.tensor(a[0])
        elif t in LUT_TARGETS:
            fn = LUT_TARGETS[t]
            if fn == "gelu" and node.kwargs.get("approximate", a[1] if len(a) > 1 else "none") == "tanh":
                fn = "gelu_tanh"
            self.emit(node, "lut", [self.tensor(a[0])], (mod or fn) + ":" + fn, function=fn)
        elif t in MATMUL_TARGETS:
            if not all(isinstance(v, torch.fx.Node) and v.name in self.alias for v in a[:2]):
                raise UnsupportedOpError(f"matmul with a constant operand is not supported ({mod or '<top>'}); use nn.Linear")
            ra, rb = len(_shape(a[0])), len(_shape(a[1]))
            if ra != rb or ra < 3:
                raise UnsupportedOpError(f"matmul of rank-{ra} and rank-{rb} activations is not supported ({mod}); "
                                         "both operands need the batch dimension and the same rank")
            self.emit(node, "matmul", [self.tensor(a[0]), self.tensor(a[1])], (mod or "matmul") + ":matmul", alpha=1.0)
        elif t in SCALE_TARGETS:
            self.scale(node, mod)
        elif t in PERMUTE_TARGETS:
            rank = len(_shape(a[0]))
            if t == aten.transpose.int:
                perm = list(range(rank))
                i, j = int(a[1]) % rank, int(a[2]) % rank
                perm[i], perm[j] = perm[j], perm[i]
            else:
                perm = [int(d) % rank for d in a[1]]
            if perm[0] != 0:
                raise UnsupportedOpError(f"{t} moves the batch dimension ({mod})")
            self.emit(node, "permute", [self.tensor(a[0])], (mod or "permute") + ":permute", perm=perm)
        elif t == aten.slice.Tensor:
            shape = _shape(a[0])
            dim = int(a[1]) % len(shape) if len(a) > 1 else 0
            start, end, step = slice(a[2] if len(a) > 2 else None, a[3] if len(a) > 3 else None,
                                     int(a[4]) if len(a) > 4 else 1).indices(shape[dim])
            if dim == 0:
                raise UnsupportedOpError(f"slicing the batch dimension is not supported ({mod})")
            if (start, end, step) == (0, shape[dim], 1):
                self.alias[node.name] = self.tensor(a[0])
            else:
                self.emit(node, "slice", [self.tensor(a[0])], (mod or "slice") + ":slice", dim=dim, start=start, end=end, step=step)
        elif t in SPLIT_TARGETS:
            shape = _shape(a[0])
            dim = int(a[2]) % len(shape) if len(a) > 2 else 0
            if dim == 0:
                raise UnsupportedOpError(f"splitting the batch dimension is not supported ({mod})")
            sizes = [int(v) for v in a[1]] if isinstance(a[1], (list, tuple)) else \
                [min(int(a[1]), shape[dim] - i) for i in range(0, shape[dim], int(a[1]))]
            self.splits[node.name] = (a[0], dim, [0, *np.cumsum(sizes).tolist()])
        elif t == aten.layer_norm.default:
            self.layer_norm(node, mod)
        elif t in SOFTMAX_TARGETS:
            rank = len(_shape(a[0]))
            if int(a[1]) % rank != rank - 1:
                raise UnsupportedOpError(f"softmax over dim {a[1]} is not supported, only over the last ({mod})")
            inputs = list(self.masked[a[0].name]) if a[0].name in self.masked else [self.tensor(a[0])]
            self.emit(node, "softmax", inputs, (mod or "softmax") + ":softmax")
        elif t == aten.eq.Scalar and a[1] == 0 and isinstance(a[0], torch.fx.Node):
            self.dropped[node.name] = self.tensor(a[0])
        elif t == aten.masked_fill.Scalar and isinstance(a[1], torch.fx.Node) and a[1].name in self.dropped \
                and a[2] == -math.inf and all(u.target in SOFTMAX_TARGETS for u in node.users):
            self.masked[node.name] = (self.tensor(a[0]), self.dropped[a[1].name])
        elif t == aten.select.int:
            self.select(node, mod)
        elif t == aten.embedding.default:
            fqn, table = self.param(a[0])
            if table.shape[0] > 1 << 16:
                raise UnsupportedOpError(f"embedding with {table.shape[0]} rows is not supported, at most 2^16 ({mod})")
            op = self.emit(node, "embedding", [self.tensor(a[1])], fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn)
            op.params = {"table": table.astype(np.float32),
                         "offset": np.zeros(_shape(node)[1:], np.float32)}
        elif t in IGNORED_TARGETS:
            pass
        else:
            raise UnsupportedOpError(
                f"op {t} in module '{mod or '<top>'}' is outside the integer op set; "
                "replace it or keep that part of the model out of the quantized graph")

    def scale(self, node, mod):
        """x·c or x/c by a constant: folded into a matmul it is the sole user of, else a `scale` op."""
        a = node.args
        if isinstance(a[0], torch.fx.Node) and isinstance(a[1], torch.fx.Node):
            raise UnsupportedOpError(f"{node.target} of two activations is not supported ({mod})")
        if not isinstance(a[0], torch.fx.Node) or not isinstance(a[1], (int, float)):
            raise UnsupportedOpError(f"{node.target} by a tensor constant is not supported ({mod})")
        c = float(a[1])
        factor = 1.0 / c if node.target in (aten.div.Tensor, aten.div.Scalar) else c
        if node.kwargs.get("rounding_mode") is not None or not (math.isfinite(factor) and factor > 0):
            raise UnsupportedOpError(f"scaling by {a[1]!r} is not supported, only by a positive finite constant ({mod})")
        x = self.tensor(a[0])
        prod = self.producer(x)
        if prod is not None and prod.kind == "matmul" and self.n_consumers.get(x, 0) == 1:
            prod.attrs["alpha"] *= factor
            prod.output = node.name
            self.alias[node.name] = node.name
            return
        self.emit(node, "scale", [x], (mod or "scale") + ":scale", factor=factor)

    def constant_add(self, node, mod) -> bool:
        """`x + P` with P a constant tensor (position rows): P joins the constant of the embedding or
        `offset` op that produces x and has no other user, else it becomes an `offset` op of its own.
        False when neither operand is a constant."""
        a = node.args
        if len(a) < 2 or not isinstance(a[0], torch.fx.Node) or not isinstance(a[1], torch.fx.Node):
            return False
        p, x = (a[1], a[0]) if self.constant(a[1]) is not None else (a[0], a[1])
        value = self.constant(p)
        if value is None or x.name not in self.alias:
            return False
        if (len(a) > 2 and a[2] != 1) or node.kwargs.get("alpha", 1) != 1:
            raise UnsupportedOpError(f"add with alpha is not supported ({mod})")
        out_shape = _shape(node)[1:]
        if len(_shape(p)) == len(_shape(node)):  # P has a batch dimension of its own: of size 1, it is one sample
            if value.shape[0] != 1:
                raise UnsupportedOpError(f"add of a constant with {value.shape[0]} samples is not supported ({mod})")
            value = value.reshape(value.shape[1:])
        if tuple(np.broadcast_shapes(value.shape, out_shape)) != tuple(out_shape):
            raise UnsupportedOpError(f"add of a constant of shape {list(value.shape)} broadcasts the activation ({mod})")
        value = np.broadcast_to(value, out_shape)
        prod = self.producer(self.alias[x.name])
        if prod is not None and prod.kind in ("embedding", "offset") and self.n_consumers.get(prod.output, 0) == 1 \
                and prod.attrs.get("act") is None:
            prod.params["offset"] = (prod.params["offset"] + value).astype(np.float32)
            prod.output = node.name
            self.alias[node.name] = node.name
        else:
            op = self.emit(node, "offset", [self.tensor(x)], (mod or "add") + ":add", pads=[0, 0] * len(out_shape))
            op.params = {"offset": value.astype(np.float32)}
        return True

    def expand(self, node, mod):
        """A constant broadcast over the batch (a class token, `token.expand(n, -1, -1)`) is kept for
        the concatenation that reads it; an activation may only keep its shape."""
        src, shape, out = node.args[0], _shape(node.args[0]), _shape(node)
        value = self.constant(src)
        if value is not None and len(shape) == len(out) and shape[0] == 1 and shape[1:] == out[1:]:
            self.broadcast[node.name] = value
        elif value is None and shape == out:
            self.alias[node.name] = self.tensor(src)
        else:
            raise UnsupportedOpError(f"expand from {list(shape)} to {list(out)} is not supported, only a constant over "
                                     f"the batch ({mod or '<top>'})")

    def constant_rows(self, node, dim, mod):
        """cat of constant rows (class tokens) and one activation: an `offset` op that pads the
        activation with zero rows where the constants go and adds them."""
        parts = node.args[0]
        acts = [x for x in parts if self.constant(x) is None]
        if len(acts) != 1:
            raise UnsupportedOpError(f"concatenation of constants with {len(acts)} activations is not supported, "
                                     f"only with one ({mod or '<top>'})")
        out_shape = _shape(node)[1:]
        pieces, before, after, seen = [], 0, 0, False
        for x in parts:
            value = self.constant(x)
            if value is None:
                seen = True
                pieces.append(np.zeros(_shape(x)[1:], np.float64))
                continue
            if value.ndim == len(out_shape) + 1:  # a parameter with a batch dimension of 1
                value = value.reshape(value.shape[1:])
            pieces.append(value)
            if seen:
                after += value.shape[dim - 1]
            else:
                before += value.shape[dim - 1]
        pads = [0, 0] * (len(out_shape) - dim) + [before, after]
        op = self.emit(node, "offset", [self.tensor(acts[0])], (mod or "cat") + ":cat", pads=pads)
        op.params = {"offset": np.concatenate(pieces, axis=dim - 1).astype(np.float32)}

    def attention(self, node, mod):
        """scaled_dot_product_attention(q, k, v) without a mask: softmax(q·kᵀ·scale)·v as a permute of
        k, a matmul with α = scale (1/√d by default), a softmax and a matmul."""
        a, kw = node.args, node.kwargs
        mask = a[3] if len(a) > 3 else kw.get("attn_mask")
        dropout = a[4] if len(a) > 4 else kw.get("dropout_p", 0.0)
        causal = a[5] if len(a) > 5 else kw.get("is_causal", False)
        if mask is not None or dropout or causal or kw.get("enable_gqa", False):
            raise UnsupportedOpError(f"scaled_dot_product_attention with a mask, causal masking, dropout or grouped "
                                     f"query heads is not supported ({mod or '<top>'})")
        q, k, v = (self.tensor(x) for x in a[:3])
        qs, ks = _shape(a[0]), _shape(a[1])
        if len(qs) < 3 or len(ks) != len(qs):
            raise UnsupportedOpError(f"scaled_dot_product_attention on rank-{len(qs)} queries is not supported ({mod})")
        scale = kw.get("scale")
        perm = list(range(len(ks)))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        base = mod or "attention"
        keys = self.step(base + ":keys", "permute", [k], node.name + "__keys", [*ks[1:-2], ks[-1], ks[-2]], perm=perm)
        scores = [*qs[1:-1], ks[-2]]
        s = self.step(base + ":scores", "matmul", [q, keys], node.name + "__scores", scores,
                      alpha=float(scale) if scale is not None else 1.0 / math.sqrt(qs[-1]))
        p = self.step(base + ":softmax", "softmax", [s], node.name + "__probs", scores)
        self.emit(node, "matmul", [p, v], base + ":context", alpha=1.0)

    def select(self, node, mod):
        """x.select(dim, i): a one-wide slice, then a reshape that drops the dimension."""
        a = node.args
        shape = _shape(a[0])
        dim = int(a[1]) % len(shape)
        i = int(a[2]) % shape[dim]
        if dim == 0:
            raise UnsupportedOpError(f"selecting along the batch dimension is not supported ({mod})")
        op = self.emit(node, "slice", [self.tensor(a[0])], (mod or "select") + ":select", dim=dim, start=i, end=i + 1, step=1)
        op.attrs["out_shape"] = [*shape[1:dim], 1, *shape[dim + 1:]]
        op.output = node.name + "__slice"
        out = list(_shape(node)[1:])
        self.ops.append(Op(name=self.unique((mod or "select") + ":reshape"), kind="reshape", inputs=[op.output],
                           output=node.name, attrs={"shape": out, "out_shape": out}))

    def layer_norm(self, node, mod):
        a = node.args
        shape = [int(v) for v in a[1]]
        in_shape = _shape(a[0])
        if len(shape) != 1 or len(in_shape) < 2:
            raise UnsupportedOpError(f"layer_norm over {shape} is not supported, only over the last dimension ({mod})")
        d = shape[0]
        _, gamma = self.param(a[2] if len(a) > 2 else None)
        _, beta = self.param(a[3] if len(a) > 3 else None)
        op = self.emit(node, "layernorm", [self.tensor(a[0])], mod or "layernorm",
                       eps=float(a[4]) if len(a) > 4 else 1e-5)
        op.params = {"gamma": (np.ones(d) if gamma is None else gamma).astype(np.float32),
                     "beta": (np.zeros(d) if beta is None else beta).astype(np.float32)}

    def mean(self, node, mod):
        a = node.args
        in_shape, out_shape = _shape(a[0]), _shape(node)
        if node.target == aten.mean.dim:
            dims = sorted(int(d) % len(in_shape) for d in a[1])
            if dims == [1] and len(in_shape) == 3:
                self.token_mean(node, mod, in_shape, out_shape)
                return
            if dims != [2, 3] or len(in_shape) != 4:
                raise UnsupportedOpError(f"mean over dims {a[1]} is not supported ({mod})")
            op = self.emit(node, "avgpool", [self.tensor(a[0])], (mod or "mean") + ":mean", **{"global": True})
            op.attrs["out_shape"] = [in_shape[1], 1, 1]
            if len(out_shape) != 4:  # keepdim=False: follow with a reshape
                op.output = node.name + "__pooled"
                self.alias[node.name] = node.name
                self.ops.append(Op(name=self.unique((mod or "mean") + ":reshape"), kind="reshape",
                                   inputs=[op.output], output=node.name,
                                   attrs={"shape": list(out_shape[1:]), "out_shape": list(out_shape[1:])}))
            return
        oh, ow = out_shape[2], out_shape[3]
        ih, iw = in_shape[2], in_shape[3]
        if (oh, ow) == (1, 1):
            self.emit(node, "avgpool", [self.tensor(a[0])], mod or "avgpool", **{"global": True})
        elif ih % oh == 0 and iw % ow == 0:
            k = [ih // oh, iw // ow]
            self.emit(node, "avgpool", [self.tensor(a[0])], mod or "avgpool", kernel=k, stride=k, padding=[0, 0])
        else:
            raise UnsupportedOpError(f"adaptive_avg_pool2d from {ih}x{iw} to {oh}x{ow} is not supported ({mod})")


    def token_mean(self, node, mod, in_shape, out_shape):
        """The mean over the tokens of (N, T, D) hidden states (`x.mean(1)`: pooling without a mask)
        as ops the integer contract already has: a permute to (N, D, T), a view as (N, D, T, 1), the
        global average pool, a view as the output."""
        _, t, d = in_shape
        base = mod or "mean"
        x = self.step(base + ":tokens_last", "permute", [self.tensor(node.args[0])], node.name + "__dt", [d, t], perm=[0, 2, 1])
        x = self.step(base + ":as_map", "reshape", [x], node.name + "__map", [d, t, 1], shape=[d, t, 1])
        x = self.step(base + ":mean", "avgpool", [x], node.name + "__pooled", [d, 1, 1], **{"global": True})
        self.step(base + ":reshape", "reshape", [x], node.name, list(out_shape[1:]), shape=list(out_shape[1:]))
        self.alias[node.name] = node.name


def capture(model: torch.nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Export `model` on one example of shape (1, *input_shape) and convert it to the IR."""
    model = model.eval()
    name = type(model).__name__
    example = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad(), _quiet_torch(), explicit_attention(model):
            ep = torch.export.export(model, (example,))
    except UnsupportedOpError:
        raise
    except Exception as exc:  # torch raises many types; all mean "this model cannot be captured"
        raise _capture_error(model, tuple(input_shape), exc) from exc
    out_spec = ep.call_spec.out_spec
    if out_spec is not None and not out_spec.is_leaf():
        raise ModelError(f"model {name} returns {_describe_output(out_spec)}, not one tensor; ptq quantizes "
                         "single-output models: make forward return the logits tensor (e.g. wrap the model)")
    b = _Capture(ep)
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(f"the model must take exactly one tensor input, it takes {len(user_inputs)}")
    for node in ep.graph.nodes:
        for inp in node.all_input_nodes:
            b.n_consumers[inp.name] = b.n_consumers.get(inp.name, 0) + 1
    outputs: list[str] = []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name == user_inputs[0]:
                b.alias[node.name] = node.name
        elif node.op == "call_function":
            b.handle(node)
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            outputs = [b.tensor(o) for o in outs]
    # n_consumers counts ATen users, identities (dropout, aliases) included, so a clamp or
    # BatchNorm is fused only into a producer it is the sole user of.
    graph = Graph(input=user_inputs[0], input_shape=tuple(input_shape), ops=b.ops, outputs=outputs)
    if not graph.weighted_ops():
        raise ModelError(f"model {name} has no conv or linear layer, so there are no weights to quantize; "
                         "give the model that holds them")
    for op in graph.ops:
        if op.weight is not None:
            op.weight = op.weight.astype(np.float32)
            op.bias = op.bias.astype(np.float32)
        if op.attrs.get("act") is not None:
            lo, hi = op.attrs["act"]
            op.attrs["act"] = [None if lo is None or math.isinf(lo) else lo,
                               None if hi is None or math.isinf(hi) else hi]
    return graph


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep what torch.export writes to stderr (its log records, and the partial graph it prints on
    data-dependent control flow) off the terminal: a failure is reported as one line by
    `_capture_error`."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _capture_error(model: torch.nn.Module, input_shape: tuple[int, ...], exc: Exception) -> ModelError:
    """One line: the exception's first line, the submodule and source line it came from, and a fix."""
    module, source = _failing_module(model, exc)
    where = f" in module '{module[0]}' ({type(module[1]).__name__})" if module else ""
    where += f" at {source}" if source else ""
    if "data-dependent" in str(exc):
        fix = "forward branches on tensor values, which torch.export cannot trace: replace the Python if/while on a tensor with torch.where or remove it"
    elif module and isinstance(module[1], (torch.nn.Conv2d, torch.nn.Linear)) and _is_first_layer(model, module[1]):
        fix = _input_shape_hint(module[1], input_shape)
    else:
        fix = "check --input-shape (input_shape=) and that forward runs on one tensor of that shape"
    return ModelError(f"torch.export could not capture the model {type(model).__name__} on input shape "
                      f"{tuple(input_shape)}{where}: {first_line(exc)}; {fix}")


def _failing_module(model: torch.nn.Module, exc: BaseException) -> tuple[tuple[str, torch.nn.Module] | None, str]:
    """The innermost submodule of `model` whose forward was running when `exc` was raised, and the
    innermost source line outside torch (the user's code)."""
    names = {id(m): n for n, m in model.named_modules()}
    torch_dir = str(Path(torch.__file__).parent)
    module, source = None, ""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = (names[id(owner)] or "<top>", owner)
        if not frame.f_code.co_filename.startswith(torch_dir):
            source = f"{Path(frame.f_code.co_filename).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return module, source


def _is_first_layer(model: torch.nn.Module, layer: torch.nn.Module) -> bool:
    return next((m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))), None) is layer


def _input_shape_hint(layer: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """What input the model's first layer takes, as an --input-shape to pass."""
    if isinstance(layer, torch.nn.Conv2d) and len(input_shape) == 3 and layer.in_channels != input_shape[0]:
        c, h, w = layer.in_channels, input_shape[1], input_shape[2]
        return f"its first layer takes {c} input channels: pass --input-shape {c},{h},{w} (input_shape=) with data of that shape"
    if isinstance(layer, torch.nn.Linear) and math.prod(input_shape) != layer.in_features:
        return (f"its first layer takes {layer.in_features} input features but the input has {math.prod(input_shape)}: "
                "pass a matching --input-shape (input_shape=) with data of that shape")
    return "check --input-shape (input_shape=) against the model's first layer"


def _describe_output(spec: Any) -> str:
    """A pytree output spec in words: 'a tuple of 2 tensors', "a dict with keys 'logits', 'aux'"."""
    if spec.type is dict:
        return f"a dict with keys {', '.join(repr(k) for k in spec.context)}"
    return f"a {getattr(spec.type, '__name__', 'structure')} of {spec.num_leaves} tensors"
