"""Reliability benchmark: every class of bad input through the CLI, and calibration peak memory.

    python -m benchmarks.reliability [--out FILE]          # markdown table of bad-input classes
    python -m benchmarks.reliability --rss [--sizes 128,1024] [--json FILE]

The table runs each command in a fresh subprocess inside a temporary directory and records the
exact one-line message, the exit code and whether a previously written good output directory (each
failing quantize is pointed at it with `--out GOOD --force`) is byte-identical afterwards. The RSS
benchmark quantizes resnet50 (random weights, bundled sample crops streamed lazily) once per
calibration size in its own subprocess and reads that child's peak RSS from os.wait4.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
TINY = "benchmarks.reliability:tiny"  # the tiny model by factory: naming it on the command line is consent to run it


class Tiny(nn.Module):
    """A 1×8×8 model small enough that each CLI run is dominated by start-up, not quantization."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(nn.functional.relu(self.conv(x)).flatten(1))


class TinyRGB(nn.Module):
    """An RGB model of any input size, for image-folder calibration."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


class TupleOut(Tiny):
    """Returns (logits, features): ptq must refuse it at capture, naming the output type."""

    def forward(self, x):
        h = nn.functional.relu(self.conv(x)).flatten(1)
        return self.fc(h), h


class Weightless(nn.Module):
    """No conv or linear layer: nothing to quantize."""

    def forward(self, x):
        return torch.relu(x).flatten(1)


class Gate(nn.Module):
    """Branches on a tensor value: data-dependent control flow torch.export cannot trace."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class Branchy(Tiny):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.fc(self.gate(nn.functional.relu(self.conv(x))).flatten(1))


class Payload:
    """Unpickling this object creates the marker file: stands for any code hidden in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


MARKER = "payload-ran"  # created in the temporary directory only if a payload ever executes


def hostile_manifest(good: Path, dst: Path, edit) -> Path:
    """A copy of the good output with `edit(manifest_dict)` applied (the tensor file and its hash stay valid)."""
    import shutil
    shutil.copytree(good, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _first_weighted(data: dict) -> dict:
    return next(op for op in data["graph"]["ops"] if "weight" in op)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def tuple_model() -> nn.Module:
    torch.manual_seed(0)
    return TupleOut().eval()


def weightless_model() -> nn.Module:
    return Weightless().eval()


def branchy_model() -> nn.Module:
    torch.manual_seed(0)
    return Branchy().eval()


def failing_factory() -> nn.Module:
    raise RuntimeError("checkpoint /models/tiny.ckpt not found\n(a second line that must not be shown)")


def exiting_factory() -> nn.Module:
    sys.exit(3)


def tiny_rgb() -> nn.Module:
    torch.manual_seed(0)
    return TinyRGB().eval()


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PTQ_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
            "COLUMNS": "400"}


def run_cli(argv: list[str], cwd: Path, extra_env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptq", *argv], cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def tree_digest(d: Path) -> str:
    """Digest of every file's name and bytes under d (empty string if d is missing)."""
    if not d.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(d)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make_fixtures(d: Path) -> dict[str, Path]:
    """The files the bad-input commands point at: models, tensors, image folders, a good output."""
    import warnings
    from PIL import Image
    from benchmarks.reliability import tiny  # not __main__.Tiny: the CLI must unpickle it by module path
    warnings.filterwarnings("ignore", category=FutureWarning)
    rng = np.random.default_rng(0)
    f = {"tiny": d / "tiny.pt", "nan_weights": d / "nan_state.pt", "script": d / "scripted.pt", "calib": d / "calib.npy",
         "nan_calib": d / "nan_calib.npy", "inf_calib": d / "inf_calib.npy", "empty_calib": d / "empty.npy",
         "few_calib": d / "few.npy", "shape_calib": d / "shape.npy", "rgb_calib": d / "rgb.npy", "int_calib": d / "int.npy",
         "imgs": d / "imgs", "bad_imgs": d / "bad_imgs", "empty_dir": d / "empty_dir", "good": d / "good",
         "corrupt": d / "corrupt", "big_calib": d / "big.npy", "complex_calib": d / "complex.npy",
         "int_pt": d / "int.pt", "trunc_imgs": d / "trunc_imgs", "short_labels": d / "short_labels.npz",
         "str_labels": d / "str_labels.npz", "onehot_labels": d / "onehot_labels.npz", "big_labels": d / "big_labels.npz",
         "latin1_recipe": d / "latin1.toml", "foreign_recipe": d / "foreign.toml", "unmatched_recipe": d / "unmatched.toml",
         "dp_weights": d / "dataparallel.pth", "broken_module": d / "ptq_rel_broken.py",
         "evil_module": d / "ptq_rel_evil.py", "evil_pickle": d / "evil.pt", "users_dir": d / "users_results",
         "not_onnx": d / "notes.onnx"}
    torch.save(tiny(), f["tiny"])
    m = tiny()
    with torch.no_grad():
        m.conv.weight[0, 0, 1, 1] = float("nan")
    torch.save(m.state_dict(), f["nan_weights"])
    torch.jit.save(torch.jit.script(tiny()), f["script"])
    x = rng.normal(size=(32, 1, 8, 8)).astype(np.float32)
    np.save(f["calib"], x)
    bad = x.copy()
    bad[5, 0, 3, 3] = np.nan
    np.save(f["nan_calib"], bad)
    bad[5, 0, 3, 3] = np.inf
    np.save(f["inf_calib"], bad)
    np.save(f["empty_calib"], x[:0])
    np.save(f["few_calib"], x[:8])
    np.save(f["shape_calib"], rng.normal(size=(32, 1, 9, 9)).astype(np.float32))
    np.save(f["rgb_calib"], rng.normal(size=(32, 3, 8, 8)).astype(np.float32))
    np.save(f["int_calib"], (x * 10).astype(np.int64))
    np.save(f["big_calib"], x.astype(np.float64) * 1e300)
    np.save(f["complex_calib"], x.astype(np.complex64))
    torch.save({"x": torch.from_numpy(x * 10).long()}, f["int_pt"])
    labels = np.arange(32) % 5
    np.savez(f["short_labels"], x=x, labels=labels[:10])
    np.savez(f["str_labels"], x=x, labels=np.array([f"c{v}" for v in labels]))
    np.savez(f["onehot_labels"], x=x, labels=np.eye(5, dtype=np.int64)[labels])
    np.savez(f["big_labels"], x=x, labels=np.arange(32) % 10)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]  # passes PIL's verify(), fails to decode
    for key, n_good, n_bad, n_trunc in (("imgs", 3, 0, 1), ("bad_imgs", 0, 2, 0), ("trunc_imgs", 0, 0, 2)):
        f[key].mkdir()
        for i in range(n_good):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(f[key] / f"ok{i}.png")
        for i in range(n_bad):
            (f[key] / f"broken{i}.jpg").write_bytes(b"this is not a jpeg" * 10)
        for i in range(n_trunc):
            (f[key] / f"truncated{i}.jpg").write_bytes(truncated)
    f["empty_dir"].mkdir()
    f["latin1_recipe"].write_bytes('method = "uniform"\ndescription = "poids réduits"\n'.encode("latin-1"))
    f["foreign_recipe"].write_text('method = "swis"\n[[overrides]]\nlayers = ["first"]\nmultipoint = { bits = 8 }\n')
    f["unmatched_recipe"].write_text('method = "uniform"\n[weights]\nbits = 4\n[[overrides]]\nlayers = ["first", "layer4.*"]\n'
                                     'weights = { bits = 8 }\n')
    torch.save({f"module.{k}": v for k, v in tiny().state_dict().items()}, f["dp_weights"])
    f["evil_module"].write_text(f"import pathlib\npathlib.Path({str(d / MARKER)!r}).write_text('imported')\n"
                                "def make():\n    from benchmarks.reliability import tiny\n    return tiny()\n")
    torch.save(Payload(d / MARKER), f["evil_pickle"])
    f["users_dir"].mkdir()
    (f["users_dir"] / "thesis.tex").write_text("not written by ptq\n")
    f["not_onnx"].write_text("plain text, not a protobuf\n")
    f["broken_module"].write_text("def tiny(:\n    pass\n")  # a SyntaxError when imported (d is on sys.path)
    return f


def derived_fixtures(d: Path, f: dict[str, Path]) -> None:
    """The fixtures made from the good output (written first): a corrupted copy and hostile manifests."""
    import shutil
    shutil.copytree(f["good"], f["corrupt"])
    blob = (f["corrupt"] / "tensors.safetensors").read_bytes()
    (f["corrupt"] / "tensors.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    f["evil_factory"] = hostile_manifest(f["good"], d / "evil_factory", lambda m: m["model"].update(
        kind="factory", name="ptq_rel_evil:make"))
    f["evil_pickled"] = hostile_manifest(f["good"], d / "evil_pickled", lambda m: m["model"].update(
        kind="file", name=str(f["evil_pickle"])))
    f["bad_mode"] = hostile_manifest(f["good"], d / "bad_mode", lambda m: _first_weighted(m)["accumulator"].update(mode="wrapping"))
    f["bad_model"] = hostile_manifest(f["good"], d / "bad_model", lambda m: m["model"].update(kind=5))
    f["no_bits"] = hostile_manifest(f["good"], d / "no_bits", lambda m: _first_weighted(m)["weight"].pop("bits"))


def cases(f: dict[str, Path]) -> list[dict]:
    """(class, argv, expected exit code); quantize commands overwrite GOOD with --force."""
    tiny_args = [TINY, "--input-shape", "1,8,8"]
    calib = ["--input-shape", "1,8,8", "--calib", str(f["calib"])]
    good = ["--out", str(f["good"]), "--force"]
    q = ["quantize"]
    return [
        {"class": "NaN in weights (state dict)", "argv": q + tiny_args + ["--weights", str(f["nan_weights"]), "--calib", str(f["calib"])] + good, "code": 2},
        {"class": "NaN in calibration data", "argv": q + tiny_args + ["--calib", str(f["nan_calib"])] + good, "code": 2},
        {"class": "Inf in calibration data", "argv": q + tiny_args + ["--calib", str(f["inf_calib"])] + good, "code": 2},
        {"class": "wrong calibration shape", "argv": q + tiny_args + ["--calib", str(f["shape_calib"])] + good, "code": 2},
        {"class": "wrong calibration dtype", "argv": q + tiny_args + ["--calib", str(f["int_calib"])] + good, "code": 2},
        {"class": "input shape the model cannot take", "argv": q + [TINY, "--input-shape", "3,8,8", "--calib", str(f["rgb_calib"])] + good, "code": 2},
        {"class": "empty calibration set (tensor)", "argv": q + tiny_args + ["--calib", str(f["empty_calib"])] + good, "code": 2},
        {"class": "empty calibration set (folder)", "argv": q + ["benchmarks.reliability:tiny_rgb", "--calib", str(f["empty_dir"])] + good, "code": 2},
        {"class": "calibration set below warn threshold (8 < 16)", "argv": q + tiny_args + ["--calib", str(f["few_calib"]), "--out", str(f["good"].with_name("few")), "--eval-size", "8", "--json"], "code": 0},
        {"class": "some images undecodable (skipped, counted)", "argv": q + ["benchmarks.reliability:tiny_rgb", "--calib", str(f["imgs"]), "--out", str(f["good"].with_name("imgs_out")), "--json"], "code": 0},
        {"class": "no decodable images", "argv": q + ["benchmarks.reliability:tiny_rgb", "--calib", str(f["bad_imgs"])] + good, "code": 2},
        {"class": "unknown recipe key", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--set", "weights.bitz=4"] + good, "code": 2},
        {"class": "weight bits out of range", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--set", "weights.bits=1"] + good, "code": 2},
        {"class": "accumulator budget out of range", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--set", "accumulator.bits=64"] + good, "code": 2},
        {"class": "infeasible allocator budget", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--recipe", "acc16",
                                                                          "--set", "allocator.mean_weight_bits=1.5"] + good, "code": 2},
        {"class": "infeasible bit-plane budget (below min_bits)", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--recipe", "bitplane",
                                                                                         "--set", "bitplane.mean_bits=2", "--set", "bitplane.min_bits=3"] + good, "code": 2},
        {"class": "bad --set syntax", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--set", "weights.bits"] + good, "code": 2},
        {"class": "unknown recipe", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--recipe", "w4a9"] + good, "code": 2},
        {"class": "unknown model name", "argv": q + ["resnet5O"] + good, "code": 2},
        {"class": "missing weights file", "argv": q + ["resnet18", "--weights", str(f["good"].with_name("nope.pth"))] + good, "code": 2},
        {"class": "missing torchvision weights", "argv": q + ["resnet18"] + good, "code": 2,
         "env": {"TORCH_HOME": str(f["good"].with_name("empty_torch_home"))}},
        {"class": "pickled model file without --trust-model-file", "argv": q + [str(f["tiny"]), "--input-shape", "1,8,8", "--calib", str(f["calib"])] + good, "code": 2},
        {"class": "TorchScript model file", "argv": q + [str(f["script"]), "--input-shape", "1,8,8", "--calib", str(f["calib"])] + good, "code": 2},
        {"class": "missing calibration file", "argv": q + tiny_args + ["--calib", str(f["good"].with_name("nope.npy"))] + good, "code": 2},
        {"class": "output directory exists (no --force)", "argv": q + tiny_args + ["--calib", str(f["calib"]), "--out", str(f["good"])], "code": 2},
        {"class": "corrupt manifest (tensor hash)", "argv": ["simulate", str(f["corrupt"]), "--data", str(f["calib"])], "code": 2},
        {"class": "not a manifest directory", "argv": ["simulate", str(f["empty_dir"])], "code": 2},
        {"class": "eval of a manifest whose FP32 model is code", "argv": ["eval", str(f["good"]), "--data", str(f["calib"])], "code": 2},
        # models
        {"class": "model factory raises", "argv": q + ["benchmarks.reliability:failing_factory"] + calib + good, "code": 2},
        {"class": "model factory module has a syntax error", "argv": q + ["ptq_rel_broken:tiny"] + calib + good, "code": 2},
        {"class": "model factory calls sys.exit", "argv": q + ["benchmarks.reliability:exiting_factory"] + calib + good, "code": 2},
        {"class": "model returns a tuple", "argv": q + ["benchmarks.reliability:tuple_model"] + calib + good, "code": 2},
        {"class": "model without conv/linear layers", "argv": q + ["benchmarks.reliability:weightless_model"] + calib + good, "code": 2},
        {"class": "data channels differ from --input-shape", "argv": q + tiny_args + ["--calib", str(f["rgb_calib"])] + good, "code": 2},
        # data
        {"class": "calibration values overflow float32", "argv": q + tiny_args + ["--calib", str(f["big_calib"])] + good, "code": 2},
        {"class": "complex calibration data", "argv": q + tiny_args + ["--calib", str(f["complex_calib"])] + good, "code": 2},
        {"class": "integer tensor in a .pt file", "argv": q + tiny_args + ["--calib", str(f["int_pt"])] + good, "code": 2},
        {"class": "only truncated images", "argv": q + ["benchmarks.reliability:tiny_rgb", "--calib", str(f["trunc_imgs"])] + good, "code": 2},
        {"class": "labels of the wrong length", "argv": q + tiny_args + calib[2:] + ["--data", str(f["short_labels"])] + good, "code": 2},
        {"class": "string labels", "argv": q + tiny_args + calib[2:] + ["--data", str(f["str_labels"])] + good, "code": 2},
        {"class": "one-hot labels", "argv": q + tiny_args + calib[2:] + ["--data", str(f["onehot_labels"])] + good, "code": 2},
        {"class": "labels beyond the model's outputs", "argv": q + tiny_args + calib[2:] + ["--data", str(f["big_labels"])] + good, "code": 2},
        # numbers
        {"class": "zero --calib-size", "argv": q + tiny_args + calib[2:] + ["--calib-size", "0"] + good, "code": 2},
        {"class": "negative --eval-size", "argv": q + tiny_args + calib[2:] + ["--eval-size", "-4"] + good, "code": 2},
        {"class": "zero simulate --size", "argv": ["simulate", str(f["good"]), "--data", str(f["calib"]), "--size", "0"], "code": 2},
        {"class": "negative seed", "argv": q + tiny_args + calib[2:] + ["--seed", "-1"] + good, "code": 2},
        {"class": "seed of 2^32", "argv": q + tiny_args + calib[2:] + ["--seed", str(2 ** 32)] + good, "code": 2},
        {"class": "--accumulator-bits 0", "argv": ["simulate", str(f["good"]), "--data", str(f["calib"]), "--accumulator-bits", "0"], "code": 2},
        {"class": "NaN recipe value", "argv": q + tiny_args + calib[2:] + ["--set", "activations.percentile=nan"] + good, "code": 2},
        {"class": "zero in --input-shape", "argv": q + [TINY, "--input-shape", "0,8,8"] + calib[2:] + good, "code": 2},
        {"class": "empty --input-shape", "argv": q + [TINY, "--input-shape", ""] + calib[2:] + good, "code": 2},
        {"class": "--input-shape with the batch dimension, huge", "argv": q + [TINY, "--input-shape", "64,3,1024,1024"] + calib[2:] + good, "code": 2},
        # recipes
        {"class": "non-UTF-8 recipe file", "argv": q + tiny_args + calib[2:] + ["--recipe", str(f["latin1_recipe"])] + good, "code": 2},
        {"class": "override key of another method", "argv": q + tiny_args + calib[2:] + ["--recipe", str(f["foreign_recipe"])] + good, "code": 2},
        {"class": "override pattern matching no layer (--strict)", "argv": q + tiny_args + calib[2:] + ["--recipe", str(f["unmatched_recipe"]), "--strict"] + good, "code": 2},
        {"class": "override pattern matching no layer (warning)", "argv": q + tiny_args + calib[2:] + ["--recipe", str(f["unmatched_recipe"]), "--out", str(f["good"].with_name("unmatched_out")), "--eval-size", "8", "--json"], "code": 0},
        # messages that used to span many lines
        {"class": "data-dependent control flow", "argv": q + ["benchmarks.reliability:branchy_model"] + calib + good, "code": 2},
        {"class": "state dict with a 'module.' prefix", "argv": q + ["benchmarks.reliability:tiny", "--weights", str(f["dp_weights"])] + calib + good, "code": 2},
        {"class": "MILP solver banner (acc16, must print nothing)", "argv": q + tiny_args + calib[2:] + ["--recipe", "acc16", "--out", str(f["good"].with_name("acc16_out")), "--json"], "code": 0,
         "quiet": True},
        # trust: a payload creates MARKER if it ever runs
        {"class": "eval of a manifest naming a factory with an import-time payload", "group": "trust",
         "argv": ["eval", str(f["evil_factory"]), "--data", str(f["calib"])], "code": 2, "markers": True},
        {"class": "eval of a manifest naming a pickled file with a payload", "group": "trust",
         "argv": ["eval", str(f["evil_pickled"]), "--data", str(f["calib"])], "code": 2, "markers": True},
        {"class": "quantize of a pickled file with a payload, no --trust-model-file", "group": "trust",
         "argv": q + [str(f["evil_pickle"])] + calib + good, "code": 2, "markers": True},
        # outputs
        {"class": "--force onto a directory ptq did not write", "group": "outputs",
         "argv": q + tiny_args + calib[2:] + ["--out", str(f["users_dir"]), "--force"], "code": 2, "keep": f["users_dir"]},
        {"class": "--out . (the working directory)", "group": "outputs", "argv": q + tiny_args + calib[2:] + ["--out", ".", "--force"], "code": 2},
        {"class": "export --out an existing directory", "group": "outputs", "argv": ["export", str(f["good"]), "--out", str(f["empty_dir"])], "code": 2},
        {"class": "inspect a missing file", "group": "outputs", "argv": ["inspect", str(f["good"].with_name("nope.onnx"))], "code": 2},
        {"class": "inspect a file that is not ONNX", "group": "outputs", "argv": ["inspect", str(f["not_onnx"])], "code": 2},
        {"class": "rich markup in a path ('x[/].npy')", "group": "outputs", "argv": q + tiny_args + ["--calib", str(f["good"].with_name("x[")) + "/].npy"] + good,
         "code": 2, "needle": "x[/].npy"},
        {"class": "rich markup in a path ('[bold]')", "group": "outputs", "argv": q + tiny_args + ["--calib", str(f["good"].with_name("[bold]nope.npy"))] + good,
         "code": 2, "needle": "[bold]nope.npy"},
        # verdicts: the output is kept for inspection, the exit code says it did not verify
        {"class": "manifest that does not verify (8-bit accumulators)", "group": "verdicts",
         "argv": q + tiny_args + calib[2:] + ["--set", "accumulator.bits=8", "--out", str(f["good"].with_name("acc8_out"))], "code": 3,
         "needle": "NOT verified: level 1"},
        # manifests the loader must refuse before any command trusts them
        {"class": "manifest with an unknown accumulator mode", "group": "manifests", "argv": ["simulate", str(f["bad_mode"]), "--data", str(f["calib"])], "code": 2},
        {"class": "manifest with a mistyped model field", "group": "manifests", "argv": ["inspect", str(f["bad_model"])], "code": 2},
        {"class": "manifest with a deleted weight field", "group": "manifests", "argv": ["export", str(f["no_bits"])], "code": 2},
    ]


def handled(case: dict, code: int, lines: list[str], intact: bool) -> bool:
    """The case's outcome is the promised one: its exit code, one stderr line for a user error (none
    for a quiet success) containing the case's needle verbatim, and the earlier good output untouched."""
    want_lines = 1 if case["code"] == 2 else 0 if case.get("quiet") else None
    return (code == case["code"] and intact and (want_lines is None or len(lines) == want_lines)
            and case.get("needle", "") in " ".join(lines))


def group(case: dict) -> str:
    """The issue-20 class a case belongs to (the original bad-input table's cases are 'inputs')."""
    return case.get("group", "inputs")


def table(out: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptq-rel-") as tmp:
        d = Path(tmp)
        f = make_fixtures(d)
        r = run_cli(["quantize", TINY, "--input-shape", "1,8,8", "--calib", str(f["calib"]), "--out", str(f["good"])], d)
        if r.returncode != 0:
            raise SystemExit(f"could not write the good output: {r.stderr}")
        derived_fixtures(d, f)
        before = tree_digest(f["good"])
        for c in cases(f):
            kept = tree_digest(c["keep"]) if "keep" in c else None
            r = run_cli(c["argv"], d, c.get("env"))
            lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
            intact = tree_digest(f["good"]) == before and (kept is None or tree_digest(c["keep"]) == kept)
            payload_ran = (d / MARKER).exists()
            intact = intact and not payload_ran
            leftovers = sorted(p.name for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
            cmd = "ptq " + shlex.join(c["argv"]).replace(tmp, "$TMP")
            shown = [l for l in lines if c["needle"] in l] if c.get("needle") and c["code"] != 2 else lines  # not a whole report
            rows.append({"class": c["class"], "command": cmd, "message": " / ".join(shown).replace(tmp, "$TMP"),
                         "exit_code": r.returncode, "expected_code": c["code"], "lines": len(lines),
                         "prior_output_intact": intact, "leftovers": leftovers,
                         "group": group(c), "payload_ran": payload_ran,
                         "handled": handled(c, r.returncode, lines, intact and not leftovers)})
            print(f"{r.returncode} {'ok ' if rows[-1]['handled'] else 'BAD'} {c['class']}: {rows[-1]['message'][:160]}", file=sys.stderr)
    md = ["| class | command | message (stderr) | exit | prior output intact |", "|---|---|---|---|---|"]
    for row in rows:
        md.append(f"| {row['class']} | `{row['command']}` | {row['message'].replace('|', '/')} | {row['exit_code']} | "
                  f"{'yes' if row['prior_output_intact'] else 'NO'}{' (leftovers: ' + ', '.join(row['leftovers']) + ')' if row['leftovers'] else ''} |")
    md.append(f"\n{sum(r['handled'] for r in rows)} of {len(rows)} classes handled (expected exit code; one line on "
              "stderr for exit 2, none when a case must be quiet; prior output intact, nothing left behind, no payload ran).")
    md += ["", "| group | cases tried | handled | remaining |", "|---|---|---|---|"]
    for g in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == g]
        ok = sum(r["handled"] for r in mine)
        md.append(f"| {g} | {len(mine)} | {ok} | {len(mine) - ok} |")
    text = "\n".join(md) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return rows


def rss(sizes: list[int], batch_size: int, extra: list[str]) -> dict:
    """Peak RSS of `ptq quantize resnet50` per calibration size, each in its own child process."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="ptq-rss-") as tmp:
            argv = [sys.executable, "-m", "ptq", "quantize", "resnet50", "--weights", "random", "--calib", "samples",
                    "--calib-size", str(n), "--eval-size", "16", "--set", f"calibration.batch_size={batch_size}",
                    "--out", str(Path(tmp) / "o"), "--json", *extra]
            t0 = time.perf_counter()
            errf = open(Path(tmp) / "stderr", "w+b")
            p = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=errf)
            out = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (Popen.wait would discard it)
            errf.seek(0)
            err = errf.read()
            errf.close()
            p.returncode = os.waitstatus_to_exitcode(status)
            secs = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"resnet50 with {n} calibration images failed ({p.returncode}): {err.decode()[-800:]}")
        res = json.loads(out)
        rows.append({"calib_size": n, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": secs,
                     "top1_agreement": res["fidelity"]["top1_agreement"], "verified": res["verified"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["peak_rss_mb"]
    return {"model": "resnet50 (--weights random)", "calib": "samples (random crops streamed lazily)",
            "batch_size": batch_size, "extra": extra, "rows": rows,
            "rss_ratio_largest_vs_smallest": rows[-1]["peak_rss_mb"] / base, "omp_num_threads": env()["OMP_NUM_THREADS"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the markdown table here (default stdout)")
    ap.add_argument("--rss", action="store_true", help="peak-RSS benchmark instead of the bad-input table")
    ap.add_argument("--sizes", default="128,1024", help="calibration sizes for --rss (first is the baseline)")
    ap.add_argument("--batch-size", type=int, default=16, help="calibration.batch_size for --rss")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for --rss runs")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    a = ap.parse_args()
    if a.rss:
        extra = [x for s in a.set for x in ("--set", s)]
        res = rss([int(s) for s in a.sizes.split(",")], a.batch_size, extra)
        print(json.dumps(res, indent=1))
    else:
        res = table(a.out)
        bad = [r["class"] for r in res if not r["handled"]]
        if bad:
            print(f"unexpected: {bad}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
