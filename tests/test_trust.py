"""Trust: a manifest, a recipe or calibration data never makes ptq run code; a pickled model file
is unpickled only with --trust-model-file; a model given with `ptq eval --model` must match the
manifest's recorded hashes.

Each attack carries a payload that would create a marker file if it ran; every test asserts exit
code 2, one line on stderr, and that no marker exists afterwards (in process and in a fresh
`python -m ptq` process).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ptq
from ptq.cli import main
from ptq.errors import ManifestError, ModelError
from ptq.manifest import MANIFEST_FILE, TENSOR_FILE

ROOT = Path(__file__).resolve().parent.parent
TINY = "benchmarks.reliability:tiny"
EVIL_MODULE = "ptq_trust_evil"


class Payload:
    """Unpickling this object opens (creates) `marker` for writing: stands for any code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_process(*argv: str, path: Path | None = None) -> tuple[int, str, str]:
    pythonpath = os.pathsep.join([str(ROOT)] + ([str(path)] if path else []))
    p = subprocess.run([sys.executable, "-m", "ptq", *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": pythonpath, "PTQ_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def refused_everywhere(capsys, argv: list[str], needle: str, markers: list[Path], path: Path | None = None,
                       process: bool = True) -> None:
    """Exit 2 with one line naming `needle`, no marker, in process and (`process`) in a fresh process."""
    for how in ("in-process", "subprocess")[: 2 if process else 1]:
        code, out, err = run(capsys, *argv) if how == "in-process" else run_process(*argv, path=path)
        assert code == 2 and out == "", (how, code, err)
        assert needle in one_line_error(err), (how, err)
        assert not [m for m in markers if m.exists()], (how, "the payload ran")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Calibration data, two state dicts of the tiny model and a manifest made from its factory."""
    from benchmarks.reliability import tiny
    d = tmp_path_factory.mktemp("trust")
    x = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    np.save(d / "calib.npy", x)
    torch.save(tiny().state_dict(), d / "weights.pt")
    other = tiny()
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    torch.save(other.state_dict(), d / "other.pt")
    qm = ptq.quantize(TINY, x, "w8a8", weights=str(d / "weights.pt"), input_shape=(1, 8, 8), eval_data=x[:16])
    qm.save(d / "factory-made")
    return d


def hostile(src: Path, dst: Path, **model_fields) -> Path:
    """A copy of the manifest `src` whose `model` field is rewritten (the tensor hash stays valid)."""
    dst.mkdir()
    shutil.copy(src / TENSOR_FILE, dst / TENSOR_FILE)
    data = json.loads((src / MANIFEST_FILE).read_text())
    data["model"].update(model_fields)
    data["model"] = {k: v for k, v in data["model"].items() if v is not None or k == "weights"}
    (dst / MANIFEST_FILE).write_text(json.dumps(data))
    return dst


def evil_module(d: Path) -> list[Path]:
    """A module that writes one marker when imported and another when its factory is called."""
    markers = [d / "imported", d / "called"]
    (d / f"{EVIL_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(markers[0])!r}).write_text('imported')\n"
        f"def make():\n    pathlib.Path({str(markers[1])!r}).write_text('called')\n"
        f"    from benchmarks.reliability import tiny\n    return tiny()\n")
    return markers


def evil_pickles(d: Path) -> tuple[dict[str, Path], Path]:
    """The same payload as a torch.save zip (.pt) and as a plain pickle (.pkl)."""
    marker = d / "unpickled"
    files = {"pt": d / "evil.pt", "pkl": d / "evil.pkl"}
    torch.save(Payload(marker), files["pt"])
    files["pkl"].write_bytes(pickle.dumps(Payload(marker), protocol=4))
    return files, marker


# ---------------------------------------------------------------- a manifest never runs code


def test_eval_refuses_a_manifest_naming_a_factory(files, tmp_path, capsys, monkeypatch):
    markers = evil_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = hostile(files / "factory-made", tmp_path / "m", kind="factory", name=f"{EVIL_MODULE}:make")
    refused_everywhere(capsys, ["eval", str(d), "--data", str(files / "calib.npy")],
                       f"--model '{EVIL_MODULE}:make'", markers, path=tmp_path)
    assert EVIL_MODULE not in sys.modules
    # loading, inspecting and simulating the manifest read the field as data only
    assert ptq.load(d).summary()["model"] == f"{EVIL_MODULE}:make"
    assert ptq.manifest.load(d).data["model"]["kind"] == "factory"
    code, _, err = run(capsys, "simulate", str(d), "--data", str(files / "calib.npy"), "--size", "8")
    assert code == 0, err
    assert not [m for m in markers if m.exists()] and EVIL_MODULE not in sys.modules


def test_eval_refuses_a_manifest_naming_a_pickled_file(files, tmp_path, capsys):
    pickles, marker = evil_pickles(tmp_path)
    for suffix, path in pickles.items():
        d = hostile(files / "factory-made", tmp_path / f"m-{suffix}", kind="file", name=str(path), weights=None,
                    weights_sha256=None)
        refused_everywhere(capsys, ["eval", str(d), "--data", str(files / "calib.npy")], "--trust-model-file", [marker],
                           process=suffix == "pt")
        with pytest.raises(ModelError, match="is code"):
            ptq.load(d).fp32_model()


@pytest.mark.parametrize("fields, needle", [
    ({"kind": "torchvision", "name": f"{EVIL_MODULE}:make"}, f"unknown model '{EVIL_MODULE}:make'"),
    ({"kind": "torchvision", "name": "squeezenet1_1", "weights": "EVIL", "weights_sha256": None}, "cannot read weights file"),
    ({"kind": "efficientnet_lite", "name": "efficientnet_lite0", "weights": "EVIL", "weights_sha256": None},
     "cannot read weights file"),
])
def test_safe_kinds_never_import_names_or_unpickle_weights(files, tmp_path, capsys, monkeypatch, fields, needle):
    """torchvision / efficientnet_lite rebuild from the manifest, but only a registered architecture,
    with weights read without unpickling."""
    markers = evil_module(tmp_path)
    pickles, marker = evil_pickles(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    if fields.get("weights") == "EVIL":
        fields = {**fields, "weights": str(pickles["pt"])}
    d = hostile(files / "factory-made", tmp_path / "m", **fields)
    refused_everywhere(capsys, ["eval", str(d), "--data", str(files / "calib.npy")], needle, markers + [marker],
                       path=tmp_path, process=fields["kind"] == "torchvision")
    assert EVIL_MODULE not in sys.modules


def test_eval_refuses_an_in_memory_model_manifest_until_given_the_module(files, tmp_path, capsys):
    from benchmarks.reliability import tiny
    x = np.load(files / "calib.npy")
    ptq.quantize(tiny(), x, "w8a8", eval_data=x[:8]).save(tmp_path / "m")
    code, _, err = run(capsys, "eval", str(tmp_path / "m"), "--data", str(files / "calib.npy"))
    assert code == 2 and "in-memory model" in one_line_error(err) and "--model SPEC" in err
    with pytest.raises(ModelError, match="in-memory model"):
        ptq.load(tmp_path / "m").evaluate(x)
    res = ptq.load(tmp_path / "m").evaluate(x, None, model=tiny())
    assert res["top1_agreement"] >= 90 and res["samples"] == 32


@pytest.mark.parametrize("field, value, where", [
    (None, "x", "'model'"), ("kind", "pickle", "'model.kind'"), ("kind", 3, "'model.kind'"),
    ("name", ["a"], "'model.name'"), ("seed", "0", "'model.seed'"), ("seed", -1, "'model.seed'"),
    ("weights", 5, "'model.weights'"), ("input_shape", [1, 8, 9], "'model.input_shape'"),
    ("weights_sha256", "abc", "'model.weights_sha256'"), ("preprocess", {"name": "x"}, "'model.preprocess.size'"),
    ("preprocess", "imagenet", "'model.preprocess'"),
])
def test_mistyped_model_fields_are_one_clean_error(files, tmp_path, capsys, field, value, where):
    d = tmp_path / "m"
    shutil.copytree(files / "factory-made", d)
    data = json.loads((d / MANIFEST_FILE).read_text())
    if field is None:
        data["model"] = value
    else:
        data["model"][field] = value
    (d / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"manifest field {where}"):
        ptq.manifest.load(d)
    for cmd in ("eval", "inspect"):
        code, _, err = run(capsys, cmd, str(d))
        assert code == 2 and f"manifest field {where}" in one_line_error(err), err


def test_rich_markup_in_a_manifest_name_cannot_break_the_error_line(files, tmp_path, capsys):
    d = hostile(files / "factory-made", tmp_path / "m", name="x[/]\n[bold]y")
    code, _, err = run(capsys, "eval", str(d))
    assert code == 2 and "'x[/]\\n[bold]y'" in one_line_error(err)


# ---------------------------------------------------------------- the user names the FP32 model


def test_eval_with_model_runs_the_named_factory_checked_against_the_hashes(files, tmp_path, capsys):
    d, calib = str(files / "factory-made"), str(files / "calib.npy")
    code, out, err = run(capsys, "eval", d, "--data", calib, "--size", "16", "--model", TINY, "--json")
    assert code == 0, err
    assert json.loads(out)["top1_agreement"] >= 90 and "warning" not in err  # the recorded weights, hash checked
    code, out, err = run(capsys, "eval", d, "--data", calib, "--size", "16", "--model", TINY,
                         "--weights", str(files / "weights.pt"), "--json")
    assert code == 0 and json.loads(out)["samples"] == 16, err
    code, out, err = run(capsys, "eval", d, "--data", calib, "--model", TINY, "--weights", str(files / "other.pt"))
    assert code == 2 and out == "" and "weights_sha256 mismatch" in one_line_error(err)
    code, _, err = run(capsys, "eval", d, "--data", calib, "--weights", str(files / "weights.pt"))
    assert code == 2 and "add --model SPEC" in one_line_error(err)


def test_eval_with_model_refuses_a_different_kind_and_unpickles_only_with_consent(files, tmp_path, capsys):
    from benchmarks.reliability import tiny
    torch.save(tiny(), tmp_path / "tiny.pt")
    d, calib = str(files / "factory-made"), str(files / "calib.npy")
    code, _, err = run(capsys, "eval", d, "--data", calib, "--model", str(tmp_path / "tiny.pt"))
    assert code == 2 and "--trust-model-file" in one_line_error(err)
    pickles, marker = evil_pickles(tmp_path)
    code, _, err = run(capsys, "eval", d, "--data", calib, "--model", str(pickles["pt"]))
    assert code == 2 and "--trust-model-file" in one_line_error(err) and not marker.exists()
    # a model file whose bytes differ from the recorded model_sha256 is refused (after the consented unpickling)
    f = hostile(files / "factory-made", tmp_path / "f", kind="file", name=str(tmp_path / "tiny.pt"), weights=None,
                weights_sha256=None, model_sha256="0" * 64)
    code, _, err = run(capsys, "eval", str(f), "--data", calib, "--model", str(tmp_path / "tiny.pt"), "--trust-model-file")
    assert code == 2 and "model_sha256 mismatch" in err and f"unpickling model file {tmp_path / 'tiny.pt'}" in err


def test_rebuild_from_the_manifest_alone_for_safe_kinds(tmp_path):
    """A torchvision architecture rebuilds without being supplied: random seeded weights, or a state
    dict file whose recorded hash must match."""
    import torchvision
    from ptq.models import rebuild
    from ptq.manifest import sha256_file
    spec = {"kind": "torchvision", "name": "squeezenet1_1", "weights": "random", "seed": 3, "input_shape": [3, 32, 32]}
    a, b = rebuild(spec), rebuild(spec)
    first = next(a.parameters())
    assert isinstance(a, torchvision.models.SqueezeNet) and torch.equal(first, next(b.parameters()))
    torch.save(a.state_dict(), tmp_path / "sq.pt")
    spec.update(weights=str(tmp_path / "sq.pt"), weights_sha256=sha256_file(tmp_path / "sq.pt"))
    assert torch.equal(next(rebuild(spec).parameters()), first)
    with pytest.raises(ModelError, match="weights_sha256 mismatch"):
        rebuild({**spec, "weights_sha256": "0" * 64})


# ---------------------------------------------------------------- no unpickling without consent


@pytest.mark.parametrize("suffix", ["pt", "pkl"])
def test_quantize_refuses_a_pickled_model_file_without_the_flag(files, tmp_path, capsys, suffix):
    pickles, marker = evil_pickles(tmp_path)
    out = tmp_path / "o"
    argv = ["quantize", str(pickles[suffix]), "--input-shape", "1,8,8", "--calib", str(files / "calib.npy"), "--out", str(out)]
    refused_everywhere(capsys, argv, "pass --trust-model-file", [marker], process=suffix == "pt")
    assert not out.exists()
    with pytest.raises(ModelError, match="--trust-model-file"):
        ptq.quantize(str(pickles[suffix]), np.load(files / "calib.npy"), input_shape=(1, 8, 8))
    assert not marker.exists()


def test_sweep_refuses_a_pickled_model_file_without_the_flag(files, tmp_path, capsys):
    pickles, marker = evil_pickles(tmp_path)
    code, _, err = run(capsys, "sweep", str(pickles["pt"]), "--budgets", "8", "--input-shape", "1,8,8",
                       "--calib", str(files / "calib.npy"), "--out", str(tmp_path / "sw"))
    assert code == 2 and "pass --trust-model-file" in one_line_error(err)
    assert not marker.exists() and not (tmp_path / "sw").exists()


@pytest.mark.parametrize("where", ["--weights", "--calib", "--calib-npy"])
def test_weights_and_calibration_files_are_never_unpickled(files, tmp_path, capsys, where):
    pickles, marker = evil_pickles(tmp_path)
    argv = ["quantize", TINY, "--input-shape", "1,8,8", "--out", str(tmp_path / "o")]
    if where == "--weights":
        argv += ["--weights", str(pickles["pt"]), "--calib", str(files / "calib.npy")]
        needle = "cannot read weights file"
    elif where == "--calib":
        argv += ["--calib", str(pickles["pt"])]
        needle = "cannot read tensor file"
    else:
        np.save(tmp_path / "evil.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
        argv += ["--calib", str(tmp_path / "evil.npy")]
        needle = "cannot read tensor file"
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in one_line_error(err)
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_trust_model_file_quantizes_a_pickled_module_and_warns(files, tmp_path, capsys):
    from benchmarks.reliability import tiny
    torch.save(tiny(), tmp_path / "tiny.pt")
    code, out, err = run(capsys, "quantize", str(tmp_path / "tiny.pt"), "--input-shape", "1,8,8", "--calib",
                         str(files / "calib.npy"), "--out", str(tmp_path / "o"), "--trust-model-file", "--json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: unpickling model file {tmp_path / 'tiny.pt'} (--trust-model-file): "
                        "this runs any code stored in it"]
    assert json.loads(out)["verified"] is True
    assert ptq.load(tmp_path / "o").manifest.data["model"]["kind"] == "file"
