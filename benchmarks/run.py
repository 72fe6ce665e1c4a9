"""Peer benchmark: ptq recipes vs onnxruntime quantize_static on the same tensors, one command.

    python -m benchmarks.run [--quick] [--out-md FILE] [--out-json FILE]
                             [--models efficientnet_lite0,digits,resnet18,resnet50] [--recipes w8a8,w8a8-fast]
                             [--peers "MinMax W8A8,W8A8"]

(`--models`, `--recipes` and `--peers` run a subset: the image models, ptq's recipes, and the
onnxruntime/Brevitas configurations by their row labels; write a subset elsewhere than BENCHMARKS.md.)

Models: efficientnet_lite0 (real weights) on held-out sample crops, a digits CNN with real labels
(accuracy), resnet18/resnet50 with random weights (speed only). Calibration and evaluation tensors
are materialised once as arrays and given to every tool. Each row runs in a fresh process so its
peak RSS is its own. Times are ratios measured in the same process: quantize time / one FP32 pass
over the calibration data, and quantized run time (ptq: integer simulator; onnxruntime: its QDQ
session) / FP32 forward (torch; onnxruntime rows: onnxruntime FP32) on one batch of 16.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ORT_SETTINGS = {  # onnxruntime's documented CPU guidance (x86 with VNNI): QDQ, U8 activations, S8 weights
    "quant_format": "QDQ", "activation_type": "QUInt8", "per_channel": True, "reduce_range": False,
    "pre_process": "onnxruntime.quantization.quant_pre_process (shape inference + graph optimisation)",
    "calibration": "MinMax / Entropy / Percentile (default percentile 99.999)", "opset": 17,
}
SPEED_BATCH = 16


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(which: str, workdir: str):
    """(torch module, name, input shape) of a benchmark model, identical in every process."""
    import torch
    if which == "digits":
        from benchmarks.digits import DigitsNet
        m = DigitsNet()
        m.load_state_dict(torch.load(Path(workdir) / "digits.pt"))
        return m.eval(), "digits-cnn", (1, 8, 8)
    from ptq.models import load_model
    lm = load_model(which, "random" if which.startswith("resnet") else None, 0)
    return lm.module.eval(), which, tuple(lm.input_shape)


def _arrays(which: str, workdir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d = Path(workdir)
    key = "digits" if which == "digits" else "images"
    labels = d / f"{key}-labels.npy"
    return np.load(d / f"{key}-calib.npy"), np.load(d / f"{key}-eval.npy"), (np.load(labels) if labels.exists() else None)


def _timed(fn, *a) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def _fp32(model, x: np.ndarray) -> tuple[np.ndarray, float]:
    """FP32 logits over x in batches of 16, and the seconds of that pass (after a warm-up batch)."""
    import torch
    with torch.no_grad():
        model(torch.from_numpy(x[:SPEED_BATCH]))
        t = time.perf_counter()
        out = np.concatenate([model(xb).numpy() for xb in torch.from_numpy(x).split(SPEED_BATCH)])
    return out, time.perf_counter() - t


def _fid(fp: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> dict:
    from ptq.metrics import fidelity
    f = fidelity(fp, q, labels)
    return {k: f[k] for k in ("top1_agreement", "top5_agreement", "kl", "sqnr_db", "accuracy", "fp32_accuracy") if k in f}


def _torch_fn(model):
    """numpy in, numpy out, without autograd: a torch model as the run functions below take it."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return run


def _against_fp32(run_q, run_fp, model, ev: np.ndarray, labels: np.ndarray | None, fidelity: bool = True) -> dict:
    """The columns every row shares: the quantized run's time over the FP32 run's on one batch of 16
    (both warmed up first), and the quantized outputs' fidelity over `ev` against the torch FP32 model."""
    batch = ev[:SPEED_BATCH]
    run_q(batch[:2]), run_fp(batch[:2])
    _, t_q = _timed(run_q, batch)
    _, t_fp = _timed(run_fp, batch)
    out = {"sim_ratio": t_q / t_fp}
    if fidelity:
        fp, _ = _fp32(model, ev)
        q = np.concatenate([run_q(xb) for xb in np.array_split(ev, max(1, len(ev) // SPEED_BATCH))])
        out.update(_fid(fp, q, labels))
    return out


def task_ptq(which: str, recipe: str, workdir: str, fidelity_rows: bool) -> dict:
    """One ptq recipe: quantize (timed, no evaluation inside), then evaluate in the integer simulator."""
    import torch
    import ptq
    torch.set_num_threads(1)
    model, name, _ = _load(which, workdir)
    calib, ev, labels = _arrays(which, workdir)
    _, t_cal = _fp32(model, calib)
    qm, t_q = _timed(lambda: ptq.quantize(model, calib, recipe, calib_size=len(calib), eval_data=ev[:1], eval_size=1))
    row = {"model": name, "tool": "ptq", "config": recipe, "mean_weight_bits": qm.report["mean_weight_bits"],
           "model_bytes": qm.report["model_bytes"], "quantize_ratio": t_q / t_cal,
           "verified": bool(qm.report["verification"]["numeric"]["ok"]),
           "quantize_stages": {k: v / t_cal for k, v in qm.report["stage_seconds"].items()}}
    row.update(_against_fp32(qm.simulate, _torch_fn(model), model, ev, labels, fidelity_rows))
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


class _Reader:
    """onnxruntime CalibrationDataReader over an array, in batches of 16."""

    def __init__(self, x: np.ndarray, name: str):
        self.batches = iter([{name: xb} for xb in np.array_split(x, max(1, len(x) // SPEED_BATCH))])

    def get_next(self):
        return next(self.batches, None)


def _weight_bits(path: Path) -> tuple[float, int]:
    """Parameter-weighted mean bits of conv/gemm weights (float ones count 32) and initializer bytes."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    bits = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
            onnx.TensorProto.FLOAT: 32}
    total = nbits = nbytes = 0
    for init in m.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        nbytes += len(init.raw_data) if init.raw_data else numpy_helper.to_array(init).nbytes
        if len(init.dims) >= 2 and init.data_type in bits:
            total += n
            nbits += n * bits[init.data_type]
    return nbits / max(total, 1), nbytes


ORT_DIGITS = ("MinMax", "QInt8", True)  # the one onnxruntime configuration run on the digits CNN


def ort_label(method: str, weight_type: str, per_channel: bool) -> str:
    """An onnxruntime configuration's row label, e.g. 'MinMax W8A8'."""
    return f"{method} W{ {'QInt8': 8, 'QInt4': 4}[weight_type]}A8{'' if per_channel else ' per-tensor (default)'}"


def task_ort(which: str, method: str, weight_type: str, per_channel: bool, workdir: str) -> dict:
    """onnxruntime quantize_static as its documentation recommends (ORT_SETTINGS), evaluated in onnxruntime."""
    import torch
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    torch.set_num_threads(1)
    model, name, shape = _load(which, workdir)
    calib, ev, labels = _arrays(which, workdir)
    _, t_cal = _fp32(model, calib)
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    fp_path, pre_path, q_path = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "q.onnx"
    torch.onnx.export(model, (torch.from_numpy(calib[:1]),), str(fp_path), opset_version=ORT_SETTINGS["opset"],
                      dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    t0 = time.perf_counter()
    quant_pre_process(str(fp_path), str(pre_path))
    quantize_static(str(pre_path), str(q_path), _Reader(calib, "input"), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=getattr(QuantType, weight_type), calibrate_method=getattr(CalibrationMethod, method))
    t_q = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    qs = ort.InferenceSession(str(q_path), opts, providers=["CPUExecutionProvider"])
    fs = ort.InferenceSession(str(fp_path), opts, providers=["CPUExecutionProvider"])
    mean_bits, nbytes = _weight_bits(q_path)
    row = {"model": name, "tool": "onnxruntime", "mean_weight_bits": mean_bits, "model_bytes": nbytes,
           "config": ort_label(method, weight_type, per_channel),
           "quantize_ratio": t_q / t_cal,
           **_against_fp32(lambda x: qs.run(None, {"input": x})[0], lambda x: fs.run(None, {"input": x})[0],
                           model, ev, labels)}
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


BREVITAS_SETTINGS = {  # Brevitas's ImageNet PTQ flow (brevitas_examples ... ptq_common) with the settings of its best
    # published mobilenet_v2 results with float scales and per-channel weights (RESULTS_TORCHVISION.csv)
    "backend": "layerwise (the default fx backend, which also quantizes adds and activations, is the "
               "'W8A8 fx backend' row)",
    "scale_factor_type": "float_scale", "weight_quant_granularity": "per_channel", "weight_quant_type": "sym",
    "bias_bit_width": 32, "act_bit_width": 8, "act_quant_type": "asym", "act_quant_percentile": 99.99,
    "layerwise_first_last_bit_width": 8, "graph_eq_iterations": 20, "graph_eq_merge_bias": True,
    "bias_correction": True, "merge_bn": True, "gptq": "W4A8 rows only",
    "relu6_to_relu": "False (the default True rewrites ReLU6 as ReLU; the 'relu6_to_relu default' row keeps it)",
    "functional convolutions": "turned into nn.Conv2d modules before preprocessing, so merge_bn folds BatchNorm",
}
BREVITAS_CONFIGS = {  # row name -> (weight bits, backend, GPTQ, relu6_to_relu)
    "W8A8": (8, "layerwise", False, False), "W4A8 GPTQ": (4, "layerwise", True, False),
    "W8A8 fx backend": (8, "fx", False, False), "W8A8 relu6_to_relu default": (8, "layerwise", False, True),
}


def _conv_modules(gm):
    """Replace torch.conv2d calls on get_attr weights with nn.Conv2d modules in an fx graph.

    efficientnet-lite-pytorch convolves with F.conv2d inside its modules; Brevitas's MergeBatchNorm and
    graph equalisation only see nn.Conv2d, so without this BatchNorm would stay unfolded in float."""
    import torch
    from torch import nn
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.conv2d, nn.functional.conv2d) or node.kwargs:
            continue
        x, w, b, stride, padding, dilation, groups = (list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:])[:7]
        if w.op != "get_attr" or (b is not None and b.op != "get_attr") or isinstance(padding, str):
            continue
        weight = gm.get_parameter(w.target)
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=b is not None)
        conv.weight = weight
        if b is not None:
            conv.bias = gm.get_parameter(b.target)
        name = f"{w.target.replace('.', '_')}_conv"
        gm.add_submodule(name, conv)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def task_brevitas(which: str, config: str, workdir: str) -> dict:
    """Brevitas PTQ as its ImageNet example recommends (BREVITAS_SETTINGS), evaluated in Brevitas (fake quant)."""
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    from torch.fx import symbolic_trace
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (apply_bias_correction, apply_gptq,
                                                                          calibrate, quantize_model)
    torch.set_num_threads(1)
    model, name, _ = _load(which, workdir)
    calib, ev, labels = _arrays(which, workdir)
    _, t_cal = _fp32(model, calib)
    bits, backend, gptq, relu6_to_relu = BREVITAS_CONFIGS[config]
    st = BREVITAS_SETTINGS
    loader = [(xb, None) for xb in torch.from_numpy(calib).split(SPEED_BATCH)]
    t0 = time.perf_counter()
    pm = preprocess_for_quantize(_conv_modules(symbolic_trace(copy.deepcopy(model))), relu6_to_relu=relu6_to_relu,
                                 equalize_iters=st["graph_eq_iterations"], equalize_merge_bias=st["graph_eq_merge_bias"],
                                 merge_bn=st["merge_bn"])
    qm = quantize_model(pm.eval(), backend=backend, weight_bit_width=bits, act_bit_width=st["act_bit_width"],
                        bias_bit_width=st["bias_bit_width"], weight_quant_granularity=st["weight_quant_granularity"],
                        act_quant_percentile=st["act_quant_percentile"], act_quant_type=st["act_quant_type"],
                        layerwise_first_last_bit_width=st["layerwise_first_last_bit_width"],
                        scale_factor_type=st["scale_factor_type"], quant_format="int")
    with torch.no_grad():
        qm(loader[0][0])
    calibrate(loader, qm)
    if gptq:
        apply_gptq(loader, qm)
    apply_bias_correction(loader, qm)
    t_q = time.perf_counter() - t0
    qm.eval()
    n = nbits = nbytes = 0
    for m in qm.modules():
        if getattr(m, "weight_quant", None) is not None and getattr(m, "weight", None) is not None and m.weight.dim() >= 2:
            b = int(m.weight_quant.bit_width())
            n, nbits = n + m.weight.numel(), nbits + m.weight.numel() * b
            nbytes += int(np.ceil(m.weight.numel() * b / 8)) + 8 * m.weight.shape[0]  # + scale and bias per channel
    if n == 0:
        raise RuntimeError("Brevitas quantized no layer")
    row = {"model": name, "tool": "brevitas", "config": config, "mean_weight_bits": nbits / n, "model_bytes": nbytes,
           "quantize_ratio": t_q / t_cal, **_against_fp32(_torch_fn(qm), _torch_fn(model), model, ev, labels)}
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def _materialise(workdir: Path, calib_n: int, eval_n: int, digits_calib: int) -> None:
    """The shared tensors: sample crops (calib / held-out eval) and digits (train subset / test + labels)."""
    import torch
    from benchmarks.digits import digits_data, train
    from ptq.api import as_source
    from ptq.models import load_model
    spec = load_model("efficientnet_lite0").spec
    for split, n, src in (("calib", calib_n, "samples"), ("eval", eval_n, "samples:eval")):
        s = as_source(src, spec, n, 0, split)
        np.save(workdir / f"images-{split}.npy", torch.cat(list(s.batches(SPEED_BATCH))).numpy())
    xtr, _, xte, yte = digits_data()
    np.save(workdir / "digits-calib.npy", xtr[:digits_calib])
    np.save(workdir / "digits-eval.npy", xte)
    np.save(workdir / "digits-labels.npy", yte)
    torch.save(train().state_dict(), workdir / "digits.pt")


def _run(fn, *args) -> dict:
    """One row in a fresh process (its own peak RSS); a failure becomes a row saying why."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        try:
            return ex.submit(fn, *args).result()
        except Exception as exc:  # a peer or recipe that fails is reported, not fatal
            return {"model": args[0], "tool": fn.__name__[5:], "config": " ".join(map(str, args[1:-1])),
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}


def header() -> dict:
    import onnxruntime
    import torch
    import ptq
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, {platform.system()} "
                       f"{platform.release()}".replace("  ", " "),
            "versions": {"python": platform.python_version(), "ptq": ptq.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                         **({"brevitas": importlib.metadata.version("brevitas")}
                            if importlib.util.find_spec("brevitas") else {})},
            "threads": 1}


COLUMNS = [("model", "model", "{}"), ("tool", "tool", "{}"), ("config", "recipe / config", "{}"),
           ("mean_weight_bits", "mean w bits", "{:.2f}"), ("model_bytes", "weight bytes", "{:,}"),
           ("top1_agreement", "top-1 agr %", "{:.1f}"), ("top5_agreement", "top-5 agr %", "{:.1f}"),
           ("accuracy", "accuracy %", "{:.1f}"), ("kl", "KL", "{:.4f}"), ("sqnr_db", "SQNR dB", "{:.1f}"),
           ("quantize_ratio", "quantize / FP32 calib pass", "{:.1f}×"), ("sim_ratio", "run / FP32 fwd", "{:.1f}×"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def markdown(res: dict) -> str:
    h = res["header"]
    lines = ["## Peer benchmark (issue 9)", "",
             f"Generated by `python -m benchmarks.run{''.join(' ' + a for a in res.get('argv', []))}` on {h['date']}; {h['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in h["versions"].items()) + "; one thread per process.", "",
             f"Data: {res['data']}", "", "onnxruntime settings: " + json.dumps(ORT_SETTINGS), ""]
    if res.get("brevitas_settings"):
        lines += ["Brevitas settings (evaluated in Brevitas's own fake-quantized float model, not integer "
                  "arithmetic): " + json.dumps(res["brevitas_settings"]), ""]
    lines += ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | {r['config']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 4))
            continue
        cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- benchmarks.run:begin -->", "<!-- benchmarks.run:end -->"


def write_section(path: Path, text: str) -> None:
    """Replace the generated section of `path` (between BEGIN and END) with `text`, keeping the
    hand-written sections around it; a file without the markers (or no file) gets the section alone.
    Written to a temporary file and renamed, so an interrupted run leaves the old file whole."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + BEGIN + "\n" + text + rest[rest.index(END):]
    else:
        new = BEGIN + "\n" + text + END + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def _notes(rows: list[dict], skipped: list[str]) -> list[str]:
    notes = list(skipped)
    ok = [r for r in rows if "error" not in r and r["model"] == "efficientnet_lite0"]
    ptq8 = next((r for r in ok if r["config"] == "w8a8"), None)
    ort8 = [r for r in ok if r["tool"] == "onnxruntime" and r["config"].endswith("W8A8")]
    if ptq8 and ort8:
        best = max(ort8, key=lambda r: r["top1_agreement"])
        ahead = [m for m in ("top1_agreement", "top5_agreement", "sqnr_db") if ptq8[m] >= best[m]]
        ahead += ["kl"] if ptq8["kl"] <= best["kl"] else []
        notes.append(f"Target ptq W8A8 ahead of the best onnxruntime W8A8 ({best['config']}) on every fidelity metric: "
                     f"{'met' if len(ahead) == 4 else 'MISSED'} (ahead on {', '.join(ahead) or 'none'}).")
        low = [r for r in ok if r["tool"] == "ptq" and r["mean_weight_bits"] <= 4.5]
        if low:
            b = max(low, key=lambda r: r["top1_agreement"])
            won = b["top1_agreement"] >= best["top1_agreement"] and b["kl"] <= best["kl"]
            notes.append(f"Target best ptq recipe at ≤ 4.5 mean bits ({b['config']}, {b['mean_weight_bits']:.2f} bits: "
                         f"{b['top1_agreement']:.1f}% / KL {b['kl']:.4f}) ahead of onnxruntime W8A8 "
                         f"({best['top1_agreement']:.1f}% / KL {best['kl']:.4f}): {'met' if won else 'MISSED'}.")
    default = next((r for r in ok if "per-tensor" in r["config"]), None)
    perch = next((r for r in ok if r["config"] == "MinMax W8A8"), None)
    if default and perch:
        notes.append(f"onnxruntime's default per_channel=False (per-tensor weights) on this depthwise + ReLU6 network: "
                     f"{default['top1_agreement']:.1f}% top-1 / KL {default['kl']:.3f} vs {perch['top1_agreement']:.1f}% / "
                     f"KL {perch['kl']:.3f} per-channel — the default loses fidelity without any warning.")
    brev = {r["config"]: r for r in ok if r["tool"] == "brevitas"}
    if ptq8 and "W8A8" in brev:
        b = brev["W8A8"]
        notes.append(f"Against Brevitas W8A8 ({b['top1_agreement']:.1f}% / KL {b['kl']:.4f}, fake-quantized float), ptq "
                     f"W8A8 in integer arithmetic: {ptq8['top1_agreement']:.1f}% / KL {ptq8['kl']:.4f}.")
        for cfg, what in (("W8A8 relu6_to_relu default", "Brevitas's default relu6_to_relu=True (ReLU6 rewritten as "
                                                            "unbounded ReLU before quantizing)"),
                          ("W8A8 fx backend", "Brevitas's default fx backend (adds and activations quantized too)")):
            if cfg in brev:
                notes.append(f"{what} on this depthwise + ReLU6 network: {brev[cfg]['top1_agreement']:.1f}% top-1 / KL "
                             f"{brev[cfg]['kl']:.3f} vs {b['top1_agreement']:.1f}% / KL {b['kl']:.3f} with the settings above, "
                             f"and no warning.")
    for r in rows:
        if r.get("tool") == "ptq" and "error" not in r:
            limit = 3 if r["config"].startswith("w") else 10
            top = sorted(r.get("quantize_stages", {}).items(), key=lambda kv: -kv[1])[:3]
            where = "".join(f"; {k.replace('_', ' ')} {v:.1f}×" for k, v in top)
            missed = [f"quantize {r['quantize_ratio']:.1f}× (target ≤ {limit}×{where})"] if r["quantize_ratio"] > limit else []
            missed += [f"simulator {r['sim_ratio']:.1f}× (target ≤ 4×)"] if r["sim_ratio"] > 4 else []
            if missed:
                notes.append(f"{r['model']} {r['config']}: target missed: {', '.join(missed)}.")
    return notes


def _settings(argv: list[str]) -> list[str]:
    """The command-line arguments that shape the results (not where they are written)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--out"):
            skip = "=" not in a
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    import ptq.recipe
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, resnet18 only (a few minutes)")
    p.add_argument("--calib-size", type=int, help="calibration samples (default 128; quick 32)")
    p.add_argument("--eval-size", type=int, help="held-out evaluation samples (default 256; quick 32)")
    p.add_argument("--out-md", default="BENCHMARKS.md",
                   help="markdown file; if it has the markers of `write_section`, only the section between them is replaced")
    p.add_argument("--out-json", default="benchmarks-peer.json")
    p.add_argument("--models", help="comma-separated subset of efficientnet_lite0,digits,resnet18,resnet50")
    p.add_argument("--recipes", help="comma-separated ptq recipes (default: every built-in one)")
    p.add_argument("--peers", help="comma-separated onnxruntime/Brevitas row labels, e.g. 'MinMax W8A8,W8A8' (default: all)")
    args = p.parse_args(argv)
    models = set(args.models.split(",")) if args.models else {"efficientnet_lite0", "digits", "resnet18", "resnet50"}
    peers = set(args.peers.split(",")) if args.peers else None
    calib_n = args.calib_size or (32 if args.quick else 128)
    eval_n = args.eval_size or (32 if args.quick else 256)
    os.environ.setdefault("PTQ_NO_PROGRESS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    recipes = args.recipes.split(",") if args.recipes else ptq.recipe.builtin_names()
    skipped, brevitas = [], [c for c in BREVITAS_CONFIGS if (not args.quick or c == "W8A8") and (peers is None or c in peers)]
    if importlib.util.find_spec("brevitas") is None or importlib.util.find_spec("tqdm") is None:
        skipped.append("Brevitas PTQ skipped: brevitas is not installed (optional extra: `pip install -e .[peers]`).")
        brevitas = []
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        _materialise(Path(wd), calib_n, eval_n, min(256, calib_n * 2))
        rows = []
        ort_cfgs = [("MinMax", "QInt8", True), ("Entropy", "QInt8", True), ("Percentile", "QInt8", True),
                    ("MinMax", "QInt4", True), ("MinMax", "QInt8", False)]
        if args.quick:
            ort_cfgs = [c for c in ort_cfgs if c[0] != "Entropy"]
        if peers is not None:
            ort_cfgs = [c for c in ort_cfgs if ort_label(*c) in peers]
        for which in [m for m in ("efficientnet_lite0", "digits") if m in models]:
            for cfg in ort_cfgs if which == "efficientnet_lite0" else [c for c in ort_cfgs if c == ORT_DIGITS]:
                rows.append(_run(task_ort, which, *cfg, wd))
                print(json.dumps(rows[-1]), flush=True)
            for cfg in brevitas if which == "efficientnet_lite0" else [c for c in brevitas if c == "W8A8"]:
                rows.append(_run(task_brevitas, which, cfg, wd))
                print(json.dumps(rows[-1]), flush=True)
            for r in recipes if which == "efficientnet_lite0" or not args.quick else [r for r in ("w8a8", "w4a8") if r in recipes]:
                rows.append(_run(task_ptq, which, r, wd, True))
                print(json.dumps(rows[-1]), flush=True)
        for which in [m for m in (("resnet18",) if args.quick else ("resnet18", "resnet50")) if m in models]:
            rows.append(_run(task_ptq, which, "w8a8", wd, False))
            print(json.dumps(rows[-1]), flush=True)
        res = {"header": header(), "quick": args.quick, "argv": _settings(argv if argv is not None else sys.argv[1:]), "rows": rows, "onnxruntime_settings": ORT_SETTINGS,
               "brevitas_settings": BREVITAS_SETTINGS if brevitas else None,
               "data": f"{calib_n} calibration / {eval_n} held-out sample crops (bundled photos, 224×224) for the "
                       f"image models, identical arrays for every tool; digits: {min(256, calib_n * 2)} training images "
                       f"to calibrate, the 397 test images with labels to evaluate. resnet rows use random weights "
                       f"(speed only; their fidelity columns are left empty).",
               "seconds": time.perf_counter() - t0}
    res["notes"] = _notes(rows, skipped)
    Path(args.out_json).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    write_section(Path(args.out_md), markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
