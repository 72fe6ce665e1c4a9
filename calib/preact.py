"""Each conv's and linear's FP32 pre-activation summed per output channel over the first calibration
samples: the mean bias correction compares the quantized model with (`ptq.biascorrect`).

The statistics pass runs the FP32 model over those samples anyway, so it takes the sums there
(`collect_statistics`) instead of bias correction running the FP32 model over them again. Each
batch's sums are added as fixed-point sums (`calib.exactsum`): the same bits over any number of
calibration ranks, in any order.
"""
from __future__ import annotations

import numpy as np
import torch

from .distributed import Shard
from .exactsum import FixedSum
from .tokens import at_kept


def channel_sums(pre: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(Σ per output channel in float64, values per channel) of one mini-batch's pre-activations: a
    conv's (N, C, H, W) or a linear's features-last tensor; at kept tokens only in a text encoder."""
    kept = at_kept(pre, keep)
    if kept.dim() == 4:  # a map's rows in float32, then across samples in float64 (33× faster than all in float64)
        s = kept.sum(dim=(2, 3)).sum(0, dtype=torch.float64)
    else:  # features last: (N, C), (N, T, C), or kept tokens' (kept, C)
        s = kept.reshape(-1, kept.shape[-1]).sum(0, dtype=torch.float64)
    return s, kept.numel() // s.numel()


class PreActSums:
    """The sums of the first `rows` samples, added batch by batch; `addends` bounds how many batches
    add to one sum, so that a batch's bound (`FixedSum`) covers the whole sum were every batch like it."""

    def __init__(self, channels: dict[str, int], rows: int, batch_size: int):
        """`channels`: each layer's output channels."""
        self.addends = -(-rows // batch_size)
        self.sums = {name: FixedSum((c,)) for name, c in channels.items()}
        self.counts = dict.fromkeys(channels, 0)

    def add(self, name: str, sums: tuple[torch.Tensor, int]) -> None:
        """One batch's `channel_sums` of layer `name` (of its rows among the first `rows` samples only)."""
        s, count = sums[0].numpy(), sums[1]
        # 2×: the float32 sums of a map may round above the exact value they approximate
        self.sums[name].add(s, 2.0 * self.addends * float(np.abs(s).max(initial=0.0)))
        self.counts[name] += count

    def merged(self, shard: Shard) -> dict[str, tuple[np.ndarray, int]]:
        """{layer: (Σ per output channel, values per channel)} over all ranks: the ranks agree on the
        unit exponents any of them used, then add each exponent's integers."""
        counts = np.array(list(self.counts.values()), np.int64)
        shard.add(counts)
        used: dict[str, set[int]] = {name: set() for name in self.sums}
        for name, exps in shard.gather([(name, sorted(s.units)) for name, s in self.sums.items()]):
            used[name].update(exps)
        out = {}
        for (name, total), count in zip(self.sums.items(), counts):
            for e in sorted(used[name]):
                shard.add(total.units.setdefault(e, np.zeros(total.shape, np.int64)))
            out[name] = (total.value(), int(count))
        return out
