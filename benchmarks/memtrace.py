"""Peak RSS of each quantize stage: the process's resident memory sampled every 0.2 s around one
`ptq.quantize`, attributed to stages by their recorded wall times.

    python -m benchmarks.memtrace MODEL RECIPE [--calib-size 32] [--eval-size 16] [--set KEY=VALUE ...]

Named torchvision models run with random weights (memory does not depend on the values);
efficientnet_lite0 with its real ones. The allocator is tuned as the command line tunes it
(`ptq.memory.reuse_freed_memory`). The attribution is by time, so a stage's figure includes
what earlier stages left allocated: it answers "how high was the RSS while this stage ran".
"""
from __future__ import annotations

import argparse
import resource
import threading
import time

import ptq
from ptq.cli import parse_sets
from ptq.memory import reuse_freed_memory
from benchmarks.speed import STAGES


def rss_gib() -> float:
    """Resident set size now (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("recipe")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--eval-size", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override, as `ptq quantize --set`")
    a = ap.parse_args()
    reuse_freed_memory()  # as `ptq quantize` runs
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((time.perf_counter(), rss_gib()))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    qm = ptq.quantize(a.model, "samples", a.recipe, weights=None if a.model == "efficientnet_lite0" else "random",
                      calib_size=a.calib_size, eval_size=a.eval_size, overrides=parse_sets(a.set))
    done.set()
    seconds, start = qm.report["stage_seconds"], 0.0
    print("| stage | seconds | peak RSS GiB |\n|---|---|---|")
    for name in STAGES:
        end = start + seconds[name]
        inside = [r for t, r in samples if start <= t - t0 < end]
        print(f"| {name.replace('_', ' ')} | {seconds[name]:.1f} | {max(inside) if inside else float('nan'):.2f} |")
        start = end
    print(f"process peak (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
