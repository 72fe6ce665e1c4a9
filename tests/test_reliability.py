"""Reliability: corrupt manifests, killed writers, determinism and bad input through the CLI.

A pipeline must be able to trust ptq unattended: it either produces a verified artefact or fails
with one line (exit 2) and leaves earlier output untouched.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptq
from ptq.cli import main
from ptq.errors import PtqError
from ptq.manifest import MANIFEST_FILE, TENSOR_FILE, sha256_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.reliability import MARKER, TINY, cases, derived_fixtures, make_fixtures, tree_digest  # noqa: E402  (needs ROOT on the path)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- manifest mutations (property test)

def _paths(obj, prefix=()):
    """Every key path into the JSON document (dict keys and list indices)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _rewrite_tensors(d: Path, data: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write tensors and make the manifest's hash and entries agree, so deeper checks must catch it."""
    from safetensors.numpy import save_file
    save_file(tensors, str(d / TENSOR_FILE))
    data["tensors"]["sha256"] = sha256_file(d / TENSOR_FILE)
    data["tensors"]["entries"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}


WRONG_VALUES = ["x", None, [], {}, 1.5, True, -7, 2 ** 40, float("nan")]


@st.composite
def mutations(draw, doc: dict, tensor_names: list[str]):
    kind = draw(st.sampled_from(["drop", "type", "int", "clamp", "tensor_range", "tensor_dtype", "tensor_shape",
                                 "truncate", "hash", "version", "pickle"]))
    graph_paths = [("graph",) + p for p in _paths(doc["graph"])] + [(k,) for k in doc] + \
                  [("tensors",) + p for p in _paths(doc["tensors"])]
    if kind == "drop":
        return kind, draw(st.sampled_from(graph_paths)), None
    if kind == "type":
        return kind, draw(st.sampled_from(graph_paths)), draw(st.sampled_from(WRONG_VALUES))
    if kind == "int":
        ints = [p for p in graph_paths if type(_get(doc, p)) is int]
        return kind, draw(st.sampled_from(ints)), draw(st.sampled_from([-7, -1, 2 ** 31, 2 ** 40, 10 ** 6]))
    if kind == "clamp":
        i = draw(st.sampled_from([i for i, op in enumerate(doc["graph"]["ops"]) if "clamp" in op]))
        return kind, ("graph", "ops", i, "clamp"), draw(st.sampled_from([[-1, 10], [0, 1 << 20], [5, 3], [0], [0.5, 3]]))
    if kind in ("tensor_range", "tensor_dtype", "tensor_shape"):
        return kind, draw(st.sampled_from(tensor_names)), draw(st.integers(0, 10 ** 6))
    if kind == "truncate":
        return kind, None, draw(st.floats(0.0, 0.99))
    if kind == "hash":
        return kind, None, draw(st.sampled_from(["0" * 64, "", "abc"]))
    if kind == "version":
        return kind, None, draw(st.sampled_from([0, 2, 99, "1", 1.0, None]))
    return kind, None, None


def _tensor_limits(doc: dict) -> dict[str, tuple[int, int]]:
    """Valid integer range of each integer tensor, from the ops that use it."""
    lim = {}
    for op in doc["graph"]["ops"]:
        if "weight" in op:
            b = op["weight"]["bits"]
            for t in op["weight"]["terms"]:
                lim[t["q"]] = (-(1 << (b - 1)) + 1, (1 << (b - 1)) - 1)
            lim[op["bias"]["q"]] = (-(2 ** 31 - 1), 2 ** 31 - 1)
            lim[op["requant"]["multiplier"]] = (0, 2 ** 31 - 1)
            lim[op["requant"]["shift"]] = (1, 62)
    return lim


def apply(d: Path, mutation, doc: dict, tensors: dict[str, np.ndarray]) -> None:
    kind, where, value = mutation
    data = json.loads(json.dumps(doc))
    if kind == "drop":
        del _get(data, where[:-1])[where[-1]]
    elif kind in ("type", "int", "clamp"):
        _get(data, where[:-1])[where[-1]] = value
    elif kind.startswith("tensor_"):
        ts = dict(tensors)
        a = ts[where].copy()
        if kind == "tensor_range":
            lo, hi = _tensor_limits(doc).get(where, (None, None))
            if lo is None:  # a float tensor: a non-finite or non-positive value
                a.flat[value % a.size] = [np.nan, np.inf, 0.0, -1.0][value % 4]
            else:  # just outside the valid range, in the stored dtype where it can hold such a value
                info = np.iinfo(a.dtype)
                bad = [int(np.clip(v, info.min, info.max)) for v in (hi + 1 + value, lo - 1 - value)[:: 1 if value % 2 else -1]]
                bad = [v for v in bad if not lo <= v <= hi]
                a = a if bad else a.astype(np.int64)
                a.flat[value % a.size] = bad[0] if bad else hi + 1 + value
        elif kind == "tensor_dtype":
            a = a.astype(np.float64 if np.issubdtype(a.dtype, np.integer) else np.int32)
        else:
            a = a.reshape(-1)[: max(a.size - 1, 0)] if value % 2 else np.concatenate([a.reshape(-1), a.reshape(-1)[:1]])
        ts[where] = np.ascontiguousarray(a)
        _rewrite_tensors(d, data, ts)
    elif kind == "truncate":
        blob = (d / TENSOR_FILE).read_bytes()
        (d / TENSOR_FILE).write_bytes(blob[: int(len(blob) * value)])
    elif kind == "hash":
        data["tensors"]["sha256"] = value
    elif kind == "version":
        data["version"] = value
    elif kind == "pickle":
        torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, d / TENSOR_FILE)
        data["tensors"]["sha256"] = sha256_file(d / TENSOR_FILE)
    (d / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def pristine(digits, digits_quantized, tmp_path_factory):
    """The saved digits manifest (json + tensors only), its decoded form, inputs and reference outputs."""
    from safetensors.numpy import load_file
    _, out = digits_quantized
    d = tmp_path_factory.mktemp("pristine")
    for f in (MANIFEST_FILE, TENSOR_FILE):
        shutil.copy(out / f, d / f)
    x = digits[3][:8]
    np.save(d.parent / "x.npy", x)
    return d, json.loads((d / MANIFEST_FILE).read_text()), load_file(str(d / TENSOR_FILE)), x, ptq.load(d).simulate(x)


def _one_line_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_mutated_manifests_fail_cleanly_or_compute_the_same(pristine, tmp_path):
    """Every mutation: ptq.load/simulate and `ptq simulate --json` either refuse with one PtqError
    line (exit 2) or run the unchanged model bit-exactly. Never another exception, never silently a
    different model."""
    src, doc, tensors, x, reference = pristine
    seen: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutations(doc, sorted(tensors)))
    def check(mutation):
        d = tmp_path / "m"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        apply(d, mutation, doc, tensors)
        try:
            y = ptq.load(d).simulate(x)
        except PtqError as exc:
            assert "\n" not in str(exc) and str(exc), mutation
            refused = True
        else:
            assert np.array_equal(y, reference), f"{mutation} loaded and computed a different model"
            refused = False
        code, out, err = cli("simulate", str(d), "--data", str(src.parent / "x.npy"), "--json")
        if refused:
            assert code == 2 and out == "", (mutation, code, err)
            _one_line_error(err)
        else:
            assert code == 0 and json.loads(out)["verified"] is True, (mutation, err)
        seen[mutation[0]] = seen.get(mutation[0], 0) + refused

    check()
    # the corruptions that must always be caught were generated and caught
    for kind in ("tensor_range", "tensor_dtype", "tensor_shape", "hash", "pickle", "version"):
        assert seen.get(kind, 0) >= 1, seen


@pytest.mark.parametrize("mutation,message", [
    (("tensor_range", "ops.0.weight.q0", 0), "fall outside"),
    (("pickle", None, None), "cannot be read"),
    (("truncate", None, 0.5), "sha256"),
    (("hash", None, "0" * 64), "sha256"),
    (("version", None, 2), "version 2"),
    (("version", None, "1"), "positive integer"),
])
def test_named_corruptions(pristine, tmp_path, mutation, message):
    src, doc, tensors, _, _ = pristine
    kind, where, value = mutation
    if kind == "tensor_range":
        where = next(op["weight"]["terms"][0]["q"] for op in doc["graph"]["ops"] if "weight" in op)
    d = tmp_path / "m"
    shutil.copytree(src, d)
    apply(d, (kind, where, value), doc, tensors)
    with pytest.raises(PtqError, match=message):
        ptq.load(d)


# ---------------------------------------------------------------- killed writers

KILL_CHILD = r"""
import os, pathlib, shutil, signal, sys
import ptq
from ptq.manifest import publish as P, store as M
src, out, point = sys.argv[1:4]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "tensors":
    M.sha256_file = lambda p: die()
if point == "json":
    orig = pathlib.Path.write_text
    pathlib.Path.write_text = lambda self, *a, **k: (orig(self, *a, **k), die())
if point == "extra":
    orig_b = pathlib.Path.write_bytes
    pathlib.Path.write_bytes = lambda self, b: (orig_b(self, b[: len(b) // 2]), die())
if point in ("before_swap", "after_swap"):
    ex = P._exchange
    P._exchange = lambda a, b: die() if point == "before_swap" else (ex(a, b), die())
ptq.load(src).save(out, force=True)
"""


@pytest.fixture(scope="module")
def two_outputs(digits, tmp_path_factory):
    """Two different good outputs of the digits model (different calibration subsets)."""
    model, xtr, _, xte, _ = digits
    d = tmp_path_factory.mktemp("two")
    for name, part in (("old", xtr[:64]), ("new", xtr[64:128])):
        ptq.quantize(model, part, "w8a8", eval_data=xte[:16]).save(d / name)
    return d / "old", d / "new"


def _artefacts(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in (MANIFEST_FILE, TENSOR_FILE, "model.onnx")}


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
            "PTQ_NO_PROGRESS": "1"}


POINTS = ("tensors", "json", "extra", "before_swap", "after_swap")


def test_killed_save_never_exposes_a_half_directory(two_outputs, tmp_path):
    """SIGKILL at each stage of a --force save (children run concurrently): the final name holds the
    complete old or the complete new output (old before the swap, new after it), the dead writer's
    tmp dir is hidden, and the next save removes it."""
    old, new = two_outputs
    procs = {}
    for point in POINTS:
        target = tmp_path / point / "out"
        shutil.copytree(old, target)
        procs[point] = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(new), str(target), point],
                                        env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for point, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (point, err)
        target = tmp_path / point / "out"
        want = new if point == "after_swap" else old
        assert tree_digest(target) == tree_digest(want), point
        assert ptq.load(target).manifest.data["graph"] == json.loads((want / MANIFEST_FILE).read_text())["graph"]
        stale = [q.name for q in target.parent.iterdir() if q.name != "out"]
        assert all(n.startswith(".out.tmp-") for n in stale), stale  # hidden, never under the final name
        ptq.load(new).save(target, force=True)
        assert [q.name for q in target.parent.iterdir()] == ["out"] and tree_digest(target) == tree_digest(new)


@pytest.mark.slow
def test_cli_killed_at_random_times_keeps_previous_output(tmp_path):
    """The real CLI, SIGKILLed mid-run at several times: the previous output stays loadable and intact."""
    f = make_fixtures(tmp_path)
    argv = [sys.executable, "-m", "ptq", "quantize", TINY, "--input-shape", "1,8,8", "--calib", str(f["calib"])]
    assert subprocess.run(argv + ["--out", str(f["good"])], env=_child_env(), cwd=tmp_path, timeout=300).returncode == 0
    old = _artefacts(f["good"])  # report.json and card.md carry timings; these three are deterministic
    t0 = time.perf_counter()
    assert subprocess.run(argv + ["--out", str(tmp_path / "new"), "--seed", "1"], env=_child_env(), cwd=tmp_path,
                          timeout=300).returncode == 0
    full = time.perf_counter() - t0
    new = _artefacts(tmp_path / "new")
    outcomes = []
    for frac in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
        p = subprocess.Popen(argv + ["--out", str(f["good"]), "--force", "--seed", "1"], env=_child_env(), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * frac)
        p.send_signal(signal.SIGKILL)
        p.wait()
        after = _artefacts(f["good"])
        assert ptq.load(f["good"]) and after in (old, new), frac  # complete old or complete new, nothing else
        outcomes.append((p.returncode, after == old))
    assert any(c == -signal.SIGKILL and kept for c, kept in outcomes), outcomes


# ---------------------------------------------------------------- determinism


def test_same_seed_and_any_thread_count_give_identical_bytes(digits, tmp_path):
    """Runs with the same seed, with 1 and 2 torch threads: manifest.json, tensors and model.onnx are
    byte-identical, and the integer simulator's codes are identical."""
    from ptq.runtime.simulator import Simulator
    model, xtr, _, xte, _ = digits
    threads = torch.get_num_threads()
    arts, codes = [], []
    try:
        for i, n in enumerate((1, 1, 2)):
            torch.set_num_threads(n)
            qm = ptq.quantize(model, xtr[:96], "w8a8", seed=5, eval_data=xte[:16])
            arts.append(_artefacts(qm.save(tmp_path / f"r{i}")))
            sim = Simulator(ptq.load(tmp_path / f"r{i}").manifest)
            out = sim.graph.outputs[0]
            codes.append(sim.run(torch.from_numpy(xte[:64]))[out].numpy())
    finally:
        torch.set_num_threads(threads)
    assert arts[0] == arts[1] == arts[2]
    assert codes[0].dtype == np.int64 and np.array_equal(codes[0], codes[1]) and np.array_equal(codes[0], codes[2])


def test_the_statistics_are_the_same_bits_at_any_thread_count(digits):
    """Batches of 8 with 16 patch positions: torch's float32 conv picks another summation order at 2
    threads than at 1 for this shape; each batch computed single-threaded keeps every range, count
    and moment, the Fisher terms and so the manifests the same bits."""
    from ptq.api import prepare, quantize_prepared
    model, xtr, _, xte, _ = digits
    over = {"calibration.positions": 16, "calibration.batch_size": 8}
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            prep = prepare(model, xtr[:96], "w8a8", seed=5, eval_data=xte[:16], overrides=over)
            li = prep.stats.layer_inputs
            got.append((prep.stats.ranges, {t: h.counts.tobytes() for t, h in prep.stats.histograms.items()},
                        {k: (v.xx.tobytes(), v.x.tobytes()) for k, v in li.items()},
                        {k: v.tobytes() for k, v in prep.stats.fisher.items()},
                        [quantize_prepared(prep, r, overrides=over).manifest.data for r in ("w8a8", "acc16")]))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1]


def test_a_pool_worker_computes_the_bits_of_one_thread():
    """`single_threaded_map`'s workers run torch on one thread each: a conv's gradients in a worker
    are the bits of the caller's single-threaded ones. A new thread does not inherit the caller's
    thread count (OpenMP and MKL keep it per thread); on an AVX-512 CPU these gradients differed by
    4·10⁻⁴ before each worker set its own."""
    from ptq.determinism import fixed_order, single_threaded_map
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 16, 8, 8, generator=gen)  # the digits CNN's stem
    w, b = torch.randn(16, 1, 3, 3, generator=gen), torch.randn(16, generator=gen)

    def grads(_: int) -> list[torch.Tensor]:
        with torch.enable_grad():
            wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
            loss = (torch.nn.functional.conv2d(x, wv, bv, padding=1).clamp(0, 6) - t).pow(2).sum()
            return list(torch.autograd.grad(loss, [wv, bv]))

    with fixed_order():
        alone = grads(0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pooled = list(single_threaded_map(grads, range(4), workers=2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, p) for got in pooled for a, p in zip(alone, got))


THREADS_CHILD = r"""
import hashlib, json, sys, tempfile
import numpy as np, torch
from ptq.api import STAGE_KEYS, prepare, quantize_prepared
from ptq.manifest import save
from ptq.recipe import builtin_names, resolve
model, calib, data = sys.argv[1:4]
net = torch.load(model, weights_only=False)
preps = {}
out = {}
with tempfile.TemporaryDirectory() as d:
    for name in builtin_names():
        # one prepare per distinct [calibration] (bitplane's sensitivity is its own)
        cal = {k: v for k, v in resolve(name)["calibration"].items() if k not in (*STAGE_KEYS, "layer_moments")}
        key = json.dumps(cal, sort_keys=True)
        if key not in preps:
            preps[key] = prepare(net, np.load(calib), "w8a8", seed=5, eval_data=np.load(data), eval_size=16,
                                 overrides={f"calibration.{k}": v for k, v in cal.items()})
        # the learned recipes at 250 of their 1000 steps: the same slices, pool and annealing to 0/1,
        # in a quarter of the time (they were 16 s of the 22 s a process took)
        p = save(quantize_prepared(preps[key], name, overrides={"rounding.iterations": 250}).manifest, f"{d}/{name}")
        out[name] = [hashlib.sha256((p / f).read_bytes()).hexdigest() for f in ("manifest.json", "tensors.safetensors")]
print(json.dumps(out))
"""


def test_every_recipe_gives_identical_bytes_at_1_and_2_threads(digits, tmp_path):
    """Every shipped recipe on the digits CNN (the learned ones at 250 steps), in processes started
    with OMP_NUM_THREADS=1 and 2 (statistics, method, manifest, bias correction and verification each
    time): manifest.json and tensors.safetensors are byte-identical."""
    from ptq.recipe import builtin_names
    model, xtr, _, xte, _ = digits
    torch.save(model, tmp_path / "digits.pt")
    np.save(tmp_path / "calib.npy", xtr[:96])
    np.save(tmp_path / "eval.npy", xte[:16])
    argv = [sys.executable, "-c", THREADS_CHILD] + [str(tmp_path / f) for f in ("digits.pt", "calib.npy", "eval.npy")]
    procs = {n: subprocess.Popen(argv, env={**_child_env(), "OMP_NUM_THREADS": str(n)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in (1, 2)}
    digests = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        digests[n] = json.loads(out.splitlines()[-1])
    assert sorted(digests[1]) == builtin_names() == sorted(f.stem for f in (ROOT / "recipes").glob("*.toml"))
    assert [r for r in digests[1] if digests[1][r] != digests[2][r]] == []


# ---------------------------------------------------------------- bad input through the CLI

EXPECTED = {
    "NaN in weights (state dict)": "contains NaN or Inf values (first in 'conv.weight')",
    "NaN in calibration data": "nan_calib.npy contains NaN or Inf",
    "Inf in calibration data": "inf_calib.npy contains NaN or Inf",
    "wrong calibration shape": "has shape (32, 1, 9, 9); the model expects (N, 1, 8, 8)",
    "wrong calibration dtype": "has dtype int64; expected preprocessed float",
    "input shape the model cannot take": ("torch.export could not capture the model Tiny on input shape (3, 8, 8) in module "
                                          "'conv' (Conv2d)", "its first layer takes 1 input channels: pass --input-shape 1,8,8"),
    "empty calibration set (tensor)": "holds no samples",
    "empty calibration set (folder)": "no images",
    "calibration set below warn threshold (8 < 16)": "warning: only 8 calibration samples",
    "some images undecodable (skipped, counted)": ("skipped 1 of 4 image files", "(first: truncated0.jpg: image file is truncated"),
    "no decodable images": ("none of the 2 image files", "(first: broken0.jpg: cannot identify image file"),
    "unknown recipe key": "did you mean 'weights.bits'?",
    "weight bits out of range": "'weights.bits' must be between 2 and 8; got 1",
    "accumulator budget out of range": "'accumulator.bits' must be between 8 and 32; got 64",
    "bad --set syntax": "--set expects key=value",
    "unknown recipe": "did you mean 'w4a8'?",
    "unknown model name": "did you mean resnet50",
    "missing weights file": "nope.pth does not exist",
    "missing torchvision weights": "pass --weights PATH",
    "pickled model file without --trust-model-file": "pass --trust-model-file if you trust it",
    "TorchScript model file": "is a TorchScript file",
    "missing calibration file": "nope.npy' does not exist",
    "output directory exists (no --force)": "pass --force",
    "corrupt manifest (tensor hash)": "does not match the sha256",
    "not a manifest directory": "is not a ptq output directory",
    "eval of a manifest whose FP32 model is code": "ptq never runs because a manifest names it; supply it yourself: ptq eval DIR --model",
    # models
    "model factory raises": "model factory 'benchmarks.reliability:failing_factory' failed: RuntimeError: checkpoint "
                            "/models/tiny.ckpt not found; fix the factory",
    "model factory module has a syntax error": "importing the module of model factory 'ptq_rel_broken:tiny' failed: "
                                               "SyntaxError",
    "model factory calls sys.exit": "model factory 'benchmarks.reliability:exiting_factory' failed: it called sys.exit(3)",
    "model returns a tuple": "model TupleOut returns a tuple of 2 tensors, not one tensor",
    "model without conv/linear layers": "model Weightless has no conv or linear layer",
    "data channels differ from --input-shape": ("rgb.npy has shape (32, 3, 8, 8); the model expects (N, 1, 8, 8)",
                                                "--input-shape 3,8,8"),
    # data
    "calibration values overflow float32": ("big.npy holds values up to", "e+300 (samples 0..15), beyond float32's range"),
    "complex calibration data": "complex.npy has dtype complex64; expected preprocessed float tensors",
    "integer tensor in a .pt file": "int.pt has dtype int64; expected preprocessed float tensors",
    "only truncated images": ("none of the 2 image files", "(first: truncated0.jpg: image file is truncated"),
    "labels of the wrong length": "short_labels.npz has 10 labels for 32 samples",
    "string labels": "str_labels.npz have dtype <U2; expected integer class indices",
    "one-hot labels": "onehot_labels.npz must be one class index per sample, shape (32,); got shape (32, 5) (one-hot?",
    "labels beyond the model's outputs": "big_labels.npz go up to 9 but the model has 5 outputs",
    # numbers
    "zero --calib-size": "calibration size (--calib-size / calib_size=) must be a positive integer; got 0",
    "negative --eval-size": "evaluation size (--eval-size / eval_size=) must be a non-negative integer (0 skips evaluation); got -4",
    "zero simulate --size": "sample count (--size) must be a positive integer; got 0",
    "negative seed": "seed (--seed) must be an integer from 0 to 4294967295; got -1",
    "seed of 2^32": "got 4294967296",
    "--accumulator-bits 0": "accumulator bits (--accumulator-bits) must be an integer from 8 to 32; got 0",
    "NaN recipe value": "recipe key 'activations.percentile' must be a finite number; got nan",
    "zero in --input-shape": "must be positive integers like 3,224,224; got (0, 8, 8)",
    "empty --input-shape": "--input-shape must be comma-separated integers like 3,224,224, got ''",
    "--input-shape with the batch dimension, huge": "input shape (64, 3, 1024, 1024) has 2.01e+08 values per sample",
    # recipes
    "non-UTF-8 recipe file": "latin1.toml is not UTF-8 text (byte 0xe9 at offset",
    "override key of another method": "overrides[0] sets 'multipoint.bits', which only method 'multipoint' reads, but this "
                                      "recipe's method is 'swis'",
    "override pattern matching no layer (--strict)": "overrides[0] layer pattern 'layer4.*' matches no conv/linear layer",
    "override pattern matching no layer (warning)": ("warning: overrides[0] layer pattern 'layer4.*' matches no conv/linear "
                                                     "layer", "--strict makes this an error"),
    # messages that used to span many lines
    "data-dependent control flow": ("torch.export could not capture the model Branchy", "in module 'gate' (Gate) at reliability.py:",
                                    "data-dependent expression"),
    "state dict with a 'module.' prefix": "4 missing key(s) (first 'conv.weight'), 4 unexpected key(s) (first "
                                          "'module.conv.weight'); strip the 'module.' prefix",
    # issue 20: trust, output places, hostile manifests
    "eval of a manifest naming a factory with an import-time payload": "factory 'ptq_rel_evil:make'), which ptq never runs",
    "eval of a manifest naming a pickled file with a payload": "which ptq never runs because a manifest names it",
    "quantize of a pickled file with a payload, no --trust-model-file": "pass --trust-model-file if you trust it",
    "--force onto a directory ptq did not write": "holds files that are not a ptq output",
    "--out . (the working directory)": "is or contains the current directory",
    "export --out an existing directory": "is a directory; give a file name such as",
    "inspect a missing file": "nope.onnx does not exist",
    "inspect a file that is not ONNX": "notes.onnx is not an ONNX model",
    "rich markup in a path ('x[/].npy')": "x[/].npy' does not exist",
    "rich markup in a path ('[bold]')": "[bold]nope.npy' does not exist",
    "manifest with an unknown accumulator mode": "'graph.ops[0].accumulator.mode': must be one of exact, wrap, saturate, got 'wrapping'",
    "manifest with a mistyped model field": "manifest field 'model.kind': must be a string, got an integer",
    "manifest with a deleted weight field": "manifest field 'graph.ops[0].weight.bits': is missing",
}


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    f = make_fixtures(d)
    code, _, err = cli("quantize", TINY, "--input-shape", "1,8,8", "--calib", str(f["calib"]), "--out", str(f["good"]))
    assert code == 0, err
    derived_fixtures(d, f)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(d))  # as for the benchmark's `python -m ptq` run in d: its factory modules import
        yield f, {c["class"]: c for c in cases(f)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_class(bad_input_dir, name, monkeypatch, capfd):
    """Each class: its exit code, the message fragments (one line, no traceback, for exit 2), the
    earlier good output untouched, and nothing written past Python's streams (C-level prints)."""
    f, table = bad_input_dir
    case = table[name]
    monkeypatch.chdir(f["good"].parent)  # as the benchmark runs: `--out .` names this scratch directory
    for k, v in case.get("env", {}).items():
        monkeypatch.setenv(k, v)
    before = tree_digest(f["good"])
    capfd.readouterr()
    code, out, err = cli(*case["argv"])
    assert code == case["code"], err
    fragments = EXPECTED[name] if isinstance(EXPECTED[name], tuple) else (EXPECTED[name],)
    for fragment in fragments:
        assert fragment in " ".join(err.split()), err
    assert "Traceback" not in err
    if code == 2:
        _one_line_error(err)
        assert out == ""
    else:
        assert json.loads(out)["verified"] is True
    assert capfd.readouterr() == ("", "")
    assert tree_digest(f["good"]) == before
    assert not [p for p in f["good"].parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not (f["good"].parent / MARKER).exists(), "a payload ran"


def test_nan_in_an_in_memory_model_is_named(digits):
    import copy
    from ptq.errors import ModelError
    model, xtr, *_ = digits
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.head.bias[3] = float("inf")
    with pytest.raises(ModelError, match=r"NaN or Inf values \(first in 'head.bias'\)"):
        ptq.quantize(bad, xtr[:32], "w8a8")


def test_in_memory_data_with_labels_is_a_pair(digits):
    """(samples, labels) in memory gives accuracy like a .npz with labels; a mismatch is one clean error."""
    from ptq.errors import DataError
    model, xtr, _, xte, yte = digits
    qm = ptq.quantize(model, xtr[:64], "w8a8", eval_data=(xte[:100], yte[:100]), eval_size=50)
    f = qm.report["fidelity"]
    assert f["samples"] == 50 and f["fp32_accuracy"] == 100.0 * float(np.mean(
        model(torch.from_numpy(xte[:50])).argmax(1).numpy() == yte[:50]))
    with pytest.raises(DataError, match="the data has 90 labels for 100 samples"):
        ptq.quantize(model, xtr[:64], "w8a8", eval_data=(xte[:100], yte[:90]))
    with pytest.raises(DataError, match=r"must be \(samples, labels\); got a tuple of 3"):
        ptq.quantize(model, xtr[:64], "w8a8", eval_data=(xte, yte, yte))


@pytest.mark.parametrize("dtype,message", [
    (np.int64, "the data has dtype int64; expected preprocessed float tensors"),
    (np.uint8, "the data has dtype uint8; expected preprocessed float tensors"),
    (np.complex64, "the data has dtype complex64; expected preprocessed float tensors"),
])
def test_in_memory_data_is_never_cast_silently(digits, dtype, message):
    """Integer arrays are refused, not cast: they are raw pixels that skipped the model's
    normalisation (calibrating on 0..255 would be wrong without a word); complex would lose a part."""
    from ptq.errors import DataError
    model, xtr, *_ = digits
    for data in (xtr[:32].astype(dtype), torch.from_numpy(xtr[:32].astype(dtype))):
        with pytest.raises(DataError, match=message):
            ptq.quantize(model, data, "w8a8")


def test_in_memory_values_beyond_float32_are_named(digits):
    from ptq.errors import DataError
    model, xtr, *_ = digits
    with pytest.raises(DataError, match=r"the data holds values up to 1e\+300, beyond float32's range"):
        ptq.quantize(model, np.where(np.arange(32)[:, None, None, None] == 3, 1e300, xtr[:32].astype(np.float64)), "w8a8")
