"""Bad input: one line on stderr naming the culprit, exit code 2, nothing written; tables that
print whole layer names."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ptq.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from benchmarks.reliability import tiny as tiny_model
    d = tmp_path_factory.mktemp("m")
    torch.save(tiny_model(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32))
    return d


def test_missing_model_name(capsys):
    code, out, err = run(capsys, "quantize", "resnet5O")
    assert code == 2 and "unknown model 'resnet5O'" in err and "resnet50" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_weights_file(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "resnet18", "--weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"))
    assert code == 2 and "nope.pth" in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_missing_pretrained_weights_suggests_weights_flag(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code, _, err = run(capsys, "quantize", "resnet18", "--out", str(tmp_path / "o"))
    assert code == 2 and "--weights" in err and "no pretrained weights" in err


def test_empty_calibration_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "quantize", "efficientnet_lite0", "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no images" in err
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_key_names_closest(capsys, tmp_path, saved_model):
    code, _, err = run(capsys, "quantize", str(saved_model / "tiny.pt"), "--trust-model-file", "--calib", str(saved_model / "calib.npy"),
                       "--input-shape", "1,8,8", "--set", "weights.bitz=4", "--out", str(tmp_path / "o"))
    assert code == 2 and "weights.bitz" in err and "weights.bits" in err


def test_corrupt_manifest(capsys, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    code, _, err = run(capsys, "simulate", str(d))
    assert code == 2 and "not valid JSON" in err


def test_quantize_json_and_simulate_json(capsys, tmp_path, saved_model):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", str(saved_model / "tiny.pt"), "--trust-model-file", "--calib", str(saved_model / "calib.npy"),
                            "--input-shape", "1,8,8", "--out", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["out"] == str(out) and res["mean_weight_bits"] == 8.0 and res["recipe"] == "w8a8"
    code, stdout, err = run(capsys, "simulate", str(out), "--data", str(saved_model / "calib.npy"), "--json")
    res = json.loads(stdout)
    assert code == 0 and res["verified"] is True and res["overflows"] == 0
    assert res["max_lsb_error"] <= 1 and res["layers"]
    code, stdout, _ = run(capsys, "quantize", str(saved_model / "tiny.pt"), "--trust-model-file", "--calib", str(saved_model / "calib.npy"),
                          "--input-shape", "1,8,8", "--out", str(out))
    assert code == 2  # refuses to overwrite without --force


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ptq", "quantize", "no_such_model_xyz"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown model" in p.stderr and "Traceback" not in p.stderr


class LongNames(torch.nn.Module):
    """Module paths of 40+ characters, as deep real models have."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder_stage_number_one_block_zero_depthwise = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.classifier_head_fully_connected_projection = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.classifier_head_fully_connected_projection(
            torch.relu(self.encoder_stage_number_one_block_zero_depthwise(x)).flatten(1))


def test_tables_print_whole_layer_names_at_80_columns(tmp_path, capsys, monkeypatch):
    """As `COLUMNS=80 ptq inspect DIR | cat` prints them: every layer name whole, nothing cut with '…'."""
    import ptq
    from ptq.calib.progress import console
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ptq.quantize(LongNames().eval(), x, "w8a8", eval_data=x[:8]).save(tmp_path / "m")
    names = ["encoder_stage_number_one_block_zero_depthwise", "classifier_head_fully_connected_projection"]
    monkeypatch.setattr(console, "width", 80)
    assert run(capsys, "export", str(tmp_path / "m"))[0] == 0
    for argv in (["inspect", str(tmp_path / "m")], ["simulate", str(tmp_path / "m"), "--data", str(tmp_path / "x.npy")],
                 ["inspect", str(tmp_path / "m" / "model.onnx")]):
        code, _, err = run(capsys, *argv)
        assert code == 0 and "…" not in err and all(n in err for n in names), err
