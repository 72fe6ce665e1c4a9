"""ONNX export benchmark: onnxruntime (QDQ twin) vs the integer simulator, file sizes, throughput.

    python -m benchmarks.export [--models efficientnet_lite0,resnet18] [--recipes w8a8,w4a8] [--eval-size 128]

resnet18 runs with random weights (agreement and speed only). Throughput is onnxruntime on the QDQ
model (basic optimisation, which keeps QDQ semantics exact) and with full optimisation (fused
integer kernels), and on the integer twin (`--format int`, bit-exact with the simulator), each as a
ratio to onnxruntime on an FP32 export of the same graph.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import ptq
from ptq.api import as_source
from ptq.metrics import fidelity


def ort_session(model_bytes: bytes, level: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def throughput(sess, x: np.ndarray, repeats: int = 3) -> float:
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    t = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, {name: x})
    return repeats * x.shape[0] / (time.perf_counter() - t)


def fp32_onnx(model: torch.nn.Module, shape) -> bytes:
    import io
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, *shape),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})
    return buf.getvalue()


def run(model_name: str, recipe: str, eval_size: int) -> dict:
    weights = None if model_name == "efficientnet_lite0" else "random"
    qm = ptq.quantize(model_name, "samples", recipe, weights=weights, calib_size=64, eval_size=16)
    from ptq.export import export, export_qdq, onnxruntime_runner
    qdq = export_qdq(qm.manifest).SerializeToString()
    src = as_source("samples:eval", qm.manifest.data["model"], eval_size, 0, "eval")
    x = src.tensor()
    sim = np.concatenate([qm.simulate(xb) for xb in x.split(16)])
    runner = onnxruntime_runner(qm.manifest)
    ort_out = np.concatenate([runner(xb) for xb in x.split(16)])
    f = fidelity(sim, ort_out)
    int_runner = onnxruntime_runner(qm.manifest, fmt="int")
    int_out = np.concatenate([int_runner(xb) for xb in x.split(16)])
    int_model = export(qm.manifest, "int").SerializeToString()
    xb = x[:8].numpy()
    fp = ort_session(fp32_onnx(qm.fp32_model(), x.shape[1:]), "all")
    t_fp = throughput(fp, xb)
    return {"model": model_name, "recipe": recipe, "onnx_bytes": len(qdq),
            "ort_vs_sim_top1": f["top1_agreement"], "ort_vs_sim_sqnr_db": f["sqnr_db"],
            "int_twin_identical": bool(np.array_equal(int_out, sim)),
            "int_over_fp32": throughput(ort_session(int_model, "basic"), xb) / t_fp,
            "qdq_basic_over_fp32": throughput(ort_session(qdq, "basic"), xb) / t_fp,
            "qdq_all_over_fp32": throughput(ort_session(qdq, "all"), xb) / t_fp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,resnet18")
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--eval-size", type=int, default=128)
    a = ap.parse_args()
    print("| model | recipe | model.onnx bytes | ort vs sim top-1 % | ort vs sim logit SQNR dB | int twin = sim | ort QDQ (basic) / FP32 throughput | ort QDQ (all) / FP32 throughput | int twin / FP32 throughput |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.models.split(","):
        for r in a.recipes.split(","):
            res = run(m, r, a.eval_size)
            print(f"| {res['model']} | {res['recipe']} | {res['onnx_bytes']} | {res['ort_vs_sim_top1']:.1f} | "
                  f"{res['ort_vs_sim_sqnr_db']:.1f} | {'identical' if res['int_twin_identical'] else 'DIFFERS'} | "
                  f"{res['qdq_basic_over_fp32']:.2f}× | {res['qdq_all_over_fp32']:.2f}× | {res['int_over_fp32']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
