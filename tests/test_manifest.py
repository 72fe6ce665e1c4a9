import json
import shutil

import numpy as np
import pytest
import torch

import ptq
from ptq.errors import ManifestError, OutputError
from ptq.manifest import MANIFEST_FILE, TENSOR_FILE


def test_round_trip_loads_and_validates(digits_quantized):
    qm, out = digits_quantized
    again = ptq.load(out)
    assert again.manifest.data["graph"] == json.loads(json.dumps(qm.manifest.data["graph"]))
    for k, v in qm.manifest.tensors.items():
        assert np.array_equal(again.manifest.tensors[k], v)
    assert (out / "card.md").read_text().startswith("# Quantization card")
    assert json.loads((out / "report.json").read_text())["recipe"] == "w8a8"
    assert (out / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("recipe", ["w8a8", "acc16"])
def test_same_seed_gives_byte_identical_manifest(digits, tmp_path, recipe):
    """acc16 too: the integer program's solve time goes to report.json, never to the manifest."""
    model, xtr, _, xte, _ = digits
    dirs = []
    for i in range(2):
        qm = ptq.quantize(model, xtr[:128], recipe, seed=3, eval_data=xte[:32])
        dirs.append(qm.save(tmp_path / f"run{i}"))
        if recipe == "acc16":
            assert qm.report["allocator_seconds"] >= 0
    for f in (MANIFEST_FILE, TENSOR_FILE):
        assert (dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes()


def test_the_manifest_and_card_name_the_platform_its_bytes_depend_on(digits_quantized):
    """torch's and numpy's versions and the CPU kernels torch dispatches to: another CPU may give
    other low-bit integers from the same inputs and seed (BENCHMARKS.md, session 28)."""
    qm, out = digits_quantized
    p = ptq.load(out).manifest.data["platform"]
    assert p == {"torch": torch.__version__, "numpy": np.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    assert f"| platform | torch {torch.__version__}, numpy {np.__version__}, CPU kernels {p['cpu_kernels']}:" in (
        out / "card.md").read_text()


def test_existing_output_is_refused_without_force(digits_quantized, tmp_path):
    qm, out = digits_quantized
    target = tmp_path / "o"
    qm.save(target)
    before = (target / MANIFEST_FILE).read_bytes()
    with pytest.raises(OutputError, match="--force"):
        qm.save(target)
    assert (target / MANIFEST_FILE).read_bytes() == before
    qm.save(target, force=True)
    assert ptq.load(target)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("graph"), "graph"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["graph"]["encodings"][d["graph"]["input"]].update(scale=-1.0), "scale"),
    (lambda d: d["graph"]["ops"][0]["weight"].update(bits=3), "values"),
    (lambda d: d["graph"]["ops"][0]["weight"].update(scheme="magic"), "scheme"),
    (lambda d: d["graph"]["ops"][0].update(inputs=["nowhere"]), "before it is produced"),
    (lambda d: d["platform"].update(torch=2), "platform.torch"),
    (lambda d: d["bias_correction"].update(chosen_on=0), "bias_correction.chosen_on"),
    (lambda d: d["bias_correction"].update(chosen=["all"]), "bias_correction.chosen"),
])
def test_corrupt_manifest_fields_are_named(digits_quantized, tmp_path, mutate, message):
    _, out = digits_quantized
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = json.loads((bad / MANIFEST_FILE).read_text())
    mutate(data)
    (bad / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        ptq.load(bad)


def test_truncated_tensor_file_is_refused(digits_quantized, tmp_path):
    _, out = digits_quantized
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    blob = (bad / TENSOR_FILE).read_bytes()
    (bad / TENSOR_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ManifestError, match="sha256"):
        ptq.load(bad)
