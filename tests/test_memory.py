"""The allocator setting ptq's own processes run with: what it changes, when it stays away, and that
the manifest does not depend on it."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


def _python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter (an allocator setting lasts for its process) and return stdout."""
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**clean, **env}, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


MAPPED = """
    import ctypes, ctypes.util
    from ptq.memory import reuse_freed_memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    print(reuse_freed_memory())
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(48 << 20)  # a 48 MB block: over the 32 MB glibc's threshold grows to
    print(libc.mallinfo2().hblkhd - before)
    libc.free(block)
"""


def test_large_blocks_come_from_the_heap_once_tuned():
    tuned, mapped = _python(MAPPED).split()
    assert tuned == "True"
    assert int(mapped) == 0  # not a mapping of its own: served from (and freed back to) the heap


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_ARENA_MAX": "2"}])
def test_a_users_own_allocator_settings_win(env):
    tuned, mapped = _python(MAPPED, **env).split()
    assert tuned == "False"
    assert int(mapped) >= 48 << 20  # glibc's default: a block this large is a mapping of its own


@pytest.mark.slow  # 11 s of a fresh process; the default suite is near its 5-minute line (session 43)
def test_the_manifest_does_not_depend_on_the_allocator():
    """Quantize the same prepared model twice in one process, before and after the setting, with
    mini-batch maps over glibc's default 32 MB threshold (8 samples × 16 × 256 × 256 float32): the
    same bytes. The tests' own process is tuned (conftest), so this runs in a fresh one."""
    out = _python("""
        import hashlib, tempfile, torch, ptq
        from pathlib import Path
        from ptq.api import prepare, quantize_prepared
        from ptq.manifest.store import save
        from ptq.memory import reuse_freed_memory
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU6(),
                                    torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
        prep = prepare(model, torch.rand(8, 3, 256, 256), "w4a8", eval_size=0,
                       overrides={"bias_correction.mode": "all", "calibration.verify_size": 1})
        digests = []
        for tune in (False, True):
            if tune:
                print(reuse_freed_memory())
            with tempfile.TemporaryDirectory() as d:
                save(quantize_prepared(prep).manifest, Path(d) / "q")  # the manifest and its tensors
                digests.append(hashlib.sha256((Path(d) / "q" / "manifest.json").read_bytes()).hexdigest())
        print(digests[0] == digests[1])
    """)
    assert out.split() == ["True", "True"]
