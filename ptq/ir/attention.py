"""nn.MultiheadAttention rewritten, for capture only, as ops of the integer op set.

In eval mode nn.MultiheadAttention runs fused kernels or moves the batch to the second dimension
(its batch_first inputs are transposed to (T, N, E) inside), which torch.export records as ops the
op table does not hold. While a model is captured, each instance is swapped for `ExplicitAttention`:
the same parameter objects under the same names (layer names and weights stay the user's), the same
function, written as one input projection (N, T, 3E), a split into q, k and v, heads by
view/transpose, scaled-dot-product attention (which capture decomposes into matmul, softmax and
matmul) and the output projection. The model is restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError


class ExplicitAttention(nn.Module):
    """Batch-first self-attention of an nn.MultiheadAttention `mha` (named `name` in the model)."""

    def __init__(self, mha: nn.MultiheadAttention, name: str):
        super().__init__()
        self.name = name
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self._qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """(output, None): the attention weights are not computed (ViT and nn.TransformerEncoderLayer
        ask for none)."""
        if query is not key or key is not value:
            raise UnsupportedOpError(f"nn.MultiheadAttention '{self.name}' is called with different query, key and "
                                     "value (cross-attention); only self-attention, mha(x, x, x), is supported")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedOpError(f"nn.MultiheadAttention '{self.name}' is called with a mask; attention masks are "
                                     "not supported there (ptq models take one input tensor)")
        n, t, e = query.shape
        h = self.num_heads
        q, k, v = (p.reshape(n, t, h, e // h).transpose(1, 2)
                   for p in F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1))
        c = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(c.transpose(1, 2).reshape(n, t, e)), None


def _check(mha: nn.MultiheadAttention, name: str) -> None:
    if not mha.batch_first:
        raise UnsupportedOpError(f"nn.MultiheadAttention '{name}' has batch_first=False, so the batch is not the first "
                                 "dimension; build it (or nn.TransformerEncoderLayer) with batch_first=True")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedOpError(f"nn.MultiheadAttention '{name}' has kdim/vdim, add_bias_kv or add_zero_attn, "
                                 "which are not supported")


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Every nn.MultiheadAttention of `model` swapped for ExplicitAttention, with torch's fused
    transformer fast path off; the model is put back as it was on exit."""
    swapped = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                _check(child, name)
                swapped.append((parent, child_name, child, name))
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for parent, child_name, child, name in swapped:
            setattr(parent, child_name, ExplicitAttention(child, name))
        yield
    finally:
        for parent, child_name, child, _ in swapped:
            setattr(parent, child_name, child)
        torch.backends.mha.set_fastpath_enabled(fast)
