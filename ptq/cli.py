"""The `ptq` command: a thin shell over the Python API.

Human output goes to stderr through rich; `--json` prints one JSON object on stdout. Exit codes:
0 success, 2 user error (one line), 3 not verified (`quantize` keeps its output for inspection),
1 internal error (traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from .calib.progress import console, set_quiet
from .errors import PtqError
from .memory import reuse_freed_memory
from .version import __version__

NOT_VERIFIED = 3  # exit code of quantize and simulate when the manifest does not verify
QUANTIZE_EXIT_CODES = """exit codes: 0 written and verified; 2 user error (one line naming the culprit and the fix);
3 written but NOT verified: the output is kept for inspection and one line names the failing check
(level 1: a validation problem or a data-free accumulator bound; level 2: simulator vs reference;
accumulator overflows) and the directory; 1 internal error (traceback with --debug)"""


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _emit(args, obj: dict) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(_json_safe(obj), sort_keys=True) + "\n")


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as recipe overrides, each value parsed as in a recipe file."""
    from .errors import RecipeError
    from .recipe import parse_value
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise RecipeError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def _shape(text: str | None) -> tuple[int, ...] | None:
    """--input-shape text as integers; the API checks their values (ptq.api.check_input_shape)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise PtqError(f"--input-shape must be comma-separated integers like 3,224,224, got {text!r}") from None


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()):
    """A rich table whose first column (layer, recipe or key names) never wraps: where the terminal is
    narrow the other columns wrap instead (`console.print`), or the table widens (`_show`)."""
    from rich.table import Table
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if c in right else "left", no_wrap=i == 0)
    return t


def _show(t) -> None:
    """Print a table of names and numbers at its natural width even where the terminal is narrower
    (80 columns, a pipe): rich would squeeze its columns and cut layer names short with an ellipsis."""
    from rich.console import Console
    from rich.measure import Measurement
    need = Measurement.get(console, console.options.update(width=1 << 16), t).maximum
    out = console if need <= console.width else Console(stderr=True, highlight=False, width=need)
    out.print(t)


def _fidelity_table(title: str, f: dict) -> None:
    t = _table(title, ("metric", "value"), right=("value",))
    for k in ("top1_agreement", "top5_agreement", "kl", "sqnr_db", "accuracy", "fp32_accuracy", "sentence_cosine",
              "sentence_cosine_min", "similarity_spearman", "mean_weight_bits", "model_bytes", "samples"):
        if k in f:
            v = f[k]
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    _show(t)


def _factory_path(spec: str | None) -> None:
    """A factory named on this command line may live in the current directory (see models.import_from)."""
    if spec:
        from .models import import_from
        import_from(Path.cwd(), spec)


def _workers(text: str | None) -> int | None:
    """--workers text as an integer; the API checks its value (ptq.api.check_workers)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise PtqError(f"--workers must be a positive integer, the number of calibration processes; got {text!r}") from None


def cmd_quantize(args) -> int:
    """Under torchrun every rank runs this: ranks other than 0 share the statistics, then exit 0
    without writing or printing (a failure they share is rank 0's to report)."""
    from .api import launched
    from .calib.progress import muted
    rank, _ = launched()
    if rank == 0:
        return _quantize(args)
    try:
        with muted():
            _quantize(args, rank)
    except PtqError as exc:
        return exc.exit_code
    return 0


def _quantize(args, rank: int = 0) -> int:
    import ptq
    from .api import check_output, end_to_end_text
    workers = _workers(args.workers)
    _factory_path(args.model)
    overrides = parse_sets(args.set)
    out = Path(args.out or f"ptq-out/{Path(args.model).stem.replace(':', '_')}-{Path(args.recipe).stem}")
    inputs = [p for p in (args.model, args.calib, args.data, args.weights) if p]
    if rank == 0:
        check_output(out, args.force, inputs)  # fail before the run; the save decides again, atomically
    t0 = time.perf_counter()
    qm = ptq.quantize(args.model, args.calib, args.recipe, weights=args.weights, calib_size=args.calib_size,
                      seed=args.seed, eval_data=args.data, eval_size=args.eval_size,
                      input_shape=_shape(args.input_shape), trust_model_file=args.trust_model_file, overrides=overrides,
                      strict=args.strict, verify=args.verify, workers=workers)
    if qm is None:  # a calibration rank other than 0: rank 0 writes the output
        return 0
    qm.save(out, force=args.force, protect=inputs)
    r = qm.report
    v = r["verification"]
    if not args.json:
        _fidelity_table(escape(f"{r['model']} · {r['recipe']} → {out}"), {**(r["fidelity"] or {}), "mean_weight_bits": r["mean_weight_bits"],
                                                                     "model_bytes": r["model_bytes"]})
    if v["verified"] and not args.json:
        console.print(f"integer simulator [green]verified[/] (level 2 on {v['level2']['samples']} of "
                      f"{v['level2']['calibration_samples']} calibration samples): max share off by >1 LSB {1 - v['numeric']['min_share_within_1lsb']:.2e}, "
                      f"{end_to_end_text(v['numeric'])}; "
                      f"{time.perf_counter() - t0:.1f}s")
    elif not v["verified"]:  # a pipeline must not take this output for a good one; it stays for inspection
        console.print(f"[red]NOT verified[/]: {escape(str(v['reason']))}; the output is kept for inspection in {escape(str(out))}", soft_wrap=True)
    _emit(args, {"out": str(out), "mean_weight_bits": r["mean_weight_bits"], "model_bytes": r["model_bytes"],
                 "recipe": r["recipe"], "method": r["method"], "seconds": time.perf_counter() - t0,
                 "verified": v["verified"], "reason": v["reason"], "fidelity": r["fidelity"]})
    return 0 if v["verified"] else NOT_VERIFIED


def cmd_simulate(args) -> int:
    import ptq
    from .api import end_to_end_text
    qm = ptq.load(args.dir)
    v = qm.verify(args.data, args.size, args.seed, args.accumulator, args.accumulator_bits)
    num, layers, overflows = v["numeric"], v["layers"], v["overflows"]
    res = {"verified": v["verified"], "reason": v["reason"], "overflows": overflows, "max_lsb_error": num["max_lsb_error"],
           "min_share_within_1lsb": num["min_share_within_1lsb"],
           "top1_agreement_vs_reference": num.get("top1_agreement_sim_vs_reference"),
           "embedding_cosine_min_vs_reference": num.get("embedding_cosine_min"),
           "accumulator_mode": v["accumulator_mode"], "samples": num["samples"], "layers": layers, "data": v["data"]}
    if not args.json:
        columns = ("layer", "acc bits", "max |acc|", "bits needed", "data-free bits", "overflows")
        t = _table(escape(f"integer simulation of {args.dir} ({num['samples']} samples, {v['data']})"), columns,
                   right=columns[1:])
        for name, l in layers.items():
            style = "red" if l["overflows"] else None
            t.add_row(escape(name), str(l["accumulator_bits"]), str(l["max_abs_acc"]), str(l["bits_needed"]),
                      str(l["data_free_bits"]), str(l["overflows"]), style=style)
        _show(t)
        if overflows:
            console.print(f"[bold red]OVERFLOW:[/] {overflows} accumulator values exceeded their declared width")
        console.print(("[green]verified[/]" if v["verified"] else f"[red]NOT verified[/] ({escape(str(v['reason']))})") +
                      f": share within 1 LSB ≥ {num['min_share_within_1lsb']:.5f} (worst {escape(str(num['worst_tensor']))}), "
                      f"{end_to_end_text(num)}", soft_wrap=True)
    _emit(args, res)
    return 0 if v["verified"] else NOT_VERIFIED


def cmd_eval(args) -> int:
    import ptq
    if (args.weights or args.trust_model_file) and not args.model:
        raise PtqError("--weights and --trust-model-file describe the FP32 model given with --model; add --model SPEC")
    _factory_path(args.model)
    qm = ptq.load(args.dir)
    res = qm.evaluate(args.data, args.size, args.backend, args.seed, model=args.model, weights=args.weights,
                      trust_model_file=args.trust_model_file)
    if not args.json:
        _fidelity_table(escape(f"fidelity of {args.dir} vs FP32 ({args.backend}, {res['data']})"), res)
    _emit(args, res)
    return 0


def cmd_recipes(args) -> int:
    from .recipe import builtin_names, resolve, schema
    rows = []
    for name in builtin_names():
        r = resolve(name)
        rows.append({"name": name, "method": r["method"], "description": r["description"]})
    keys = {(f"{s}.{k}" if s else k): {"default": f.default, "help": f.help, "choices": list(f.choices) if f.choices else None}
            for s, fs in schema().items() for k, f in fs.items()}
    if not args.json:
        t = _table("built-in recipes", ("name", "method", "description"))
        for r in rows:
            t.add_row(escape(r["name"]), escape(r["method"]), escape(r["description"]))
        console.print(t)  # descriptions wrap
        if args.keys:
            kt = _table("recipe keys (override with --set key=value)", ("key", "default", "choices / help"))
            for k, v in keys.items():
                kt.add_row(k, escape(repr(v["default"])), escape(", ".join(v["choices"]) if v["choices"] else v["help"]))
            console.print(kt)
    _emit(args, {"recipes": rows, "keys": keys})
    return 0


def cmd_inspect(args) -> int:
    if str(args.dir).lower().endswith(".onnx") or Path(args.dir).is_file():
        return _inspect_onnx(args)
    import ptq
    res = ptq.load(args.dir).summary()
    if not args.json:
        t = _table(escape(f"{args.dir}: {res['model']} · {res['recipe']} · {res['ops']} ops · mean {res['mean_weight_bits']:.2f} bits"),
                   ("layer", "scheme", "bits", "shape", "in bits", "acc", "data-free", "bias corr."))
        for l in res["layers"]:
            t.add_row(escape(l["name"]), l["scheme"], f"{l['bits_per_weight']:.3g}", "×".join(map(str, l["shape"])),
                      str(l["input_bits"]), str(l["accumulator_bits"]), str(l["data_free_bits"]), "yes" if l["bias_corrected"] else "")
        _show(t)
    _emit(args, res)
    return 0


def cmd_export(args) -> int:
    import ptq
    qm = ptq.load(args.dir)
    default = {"qdq": "model.onnx", "qonnx": "model.qonnx.onnx", "int": "model.int.onnx",
               "aimet": "model.encodings"}[args.format]
    out = Path(args.out) if args.out else Path(args.dir) / default
    if args.format == "aimet":
        qm.export_aimet(out)
        sha = qm.manifest.hash()
    else:
        from .export import read_ptq_metadata
        qm.export_onnx(out, args.format)
        sha = read_ptq_metadata(out)["model"]["ptq.manifest_sha256"]
    res = {"path": str(out), "format": args.format, "bytes": out.stat().st_size, "manifest_sha256": sha}
    if not args.json:
        console.print(escape(f"wrote {out} ({args.format}, {res['bytes']} bytes)"))
    _emit(args, res)
    return 0


def _inspect_onnx(args) -> int:
    from .export import read_ptq_metadata
    res = read_ptq_metadata(args.dir)
    if not args.json:
        t = _table(escape(f"{args.dir}: IR {res['ir_version']} · {res['model'].get('ptq.recipe')} · "
                          f"manifest {res['model'].get('ptq.manifest_sha256', '')[:12]}"),
                   ("layer", "op", "scheme", "bits", "terms", "acc", "mode", "data-free", "bias corr."))
        for name, l in res["layers"].items():
            cells = (name, l["op_type"], l.get("scheme"), l.get("bits_per_weight"), l.get("terms"), l.get("accumulator_bits"),
                     l.get("accumulator_mode"), l.get("data_free_bits"), "yes" if l.get("bias_corrected") else "")
            t.add_row(*(escape(str(c)) for c in cells))  # read from a file: any string may hold markup
        _show(t)
    _emit(args, {k: v for k, v in res.items() if k != "nodes"})
    return 0


def cmd_card(args) -> int:
    """The card.md quantize wrote, once manifest.json's header says this is a ptq output (no torch:
    this takes well under a second); without a card.md, the card rendered from the loaded manifest."""
    from .manifest.store import read_data
    read_data(args.dir)
    p = Path(args.dir) / "card.md"
    if p.is_file():
        sys.stdout.write(p.read_text())
        return 0
    import ptq
    sys.stdout.write(ptq.load(args.dir).card())
    return 0


def cmd_sweep(args) -> int:
    from .sweep import load_peers, parse_budgets, peers_for, plot, sweep
    budgets = parse_budgets(args.budgets)
    _factory_path(args.model)
    peers = load_peers(args.peers) if args.peers else None
    out = Path(args.out or f"ptq-out/{Path(args.model).stem.replace(':', '_')}-sweep")
    t0 = time.perf_counter()
    res = sweep(args.model, args.recipe or ["w4a8"], budgets, calib=args.calib, calib_size=args.calib_size,
                eval_size=args.eval_size, eval_data=args.data, seed=args.seed, weights=args.weights,
                input_shape=_shape(args.input_shape), trust_model_file=args.trust_model_file)
    if peers:
        peers = peers_for(peers, res["model"])
        if not peers:
            console.print("[yellow]warning:[/] " + escape(f"{args.peers} has no peer rows for model {res['model']}; none overlaid"))
    res["peers"] = peers or []
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(_json_safe(res), sort_keys=True, indent=1) + "\n")
    png = plot(res, out / "sweep.png", peers)
    if not args.json:
        columns = ("recipe", "budget", "mean bits", "top-1 %", "top-5 %", "KL", "SQNR dB")
        t = _table(escape(f"{res['model']} sweep → {out} ({time.perf_counter() - t0:.0f}s, "
                          f"{res['calibration_passes']} calibration pass(es))"), columns, right=columns[1:])
        for q in res["points"]:
            t.add_row(escape(q["recipe"]), f"{q['budget']:g}", f"{q['mean_weight_bits']:.2f}", f"{q['top1_agreement']:.1f}",
                      f"{q['top5_agreement']:.1f}", f"{q['kl']:.4f}", f"{q['sqnr_db']:.1f}")
        _show(t)
        for s in res["skipped"]:
            console.print("[dim]" + escape(f"skipped {s['recipe']} @ {s['budget']:g}: {s['reason']}") + "[/]")
    _emit(args, {**res, "json": str(out / "sweep.json"), "png": str(png)})
    return 0


QUIET_HELP = ("no progress on stderr (neither the one line per stage written where stderr is not a terminal "
              "nor the bars on one); warnings and errors still show")
TRUST_HELP = "allow unpickling a saved model file (.pt/.pkl): this runs any code stored in it; only for files you trust"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptq", description="Post-training quantization with a verified integer manifest.")
    p.add_argument("--version", action="version", version=f"ptq {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a verified manifest directory",
                       epilog=QUANTIZE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model", help="torchvision name, efficientnet_lite0, a saved .pt module, or pkg.module:factory")
    q.add_argument("--recipe", default="w8a8", help="built-in recipe name or a .toml file (see `ptq recipes`)")
    q.add_argument("--calib", default="samples", help="image folder, .npy/.npz/.pt tensor file, or 'samples' (bundled photos)")
    q.add_argument("--calib-size", type=int, help="number of calibration samples (recipe default 128)")
    q.add_argument("--weights", help="state dict file, or 'random' (speed tests only)")
    q.add_argument("--out", help="output directory (default ptq-out/MODEL-RECIPE)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. weights.bits=4")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data", help="held-out evaluation data (default: held-out sample photos when --calib samples)")
    q.add_argument("--eval-size", type=int, default=64, help="samples fidelity is measured on (default 64; 0 skips evaluation)")
    q.add_argument("--verify", choices=("sample", "full"), default="sample",
                   help="level 2 (simulator vs reference) on the first calibration.verify_size calibration samples "
                        "(sample, default 32) or on all of them (full); level 1 always runs in full")
    q.add_argument("--input-shape", help="per-sample input shape for models without a known one, e.g. 1,8,8")
    q.add_argument("--workers", metavar="N", help="collect the calibration statistics in N processes on this machine "
                                                  "(torch.distributed, gloo; the same bits as one process); under "
                                                  "torchrun leave it out: every rank runs `ptq quantize` and rank 0 writes")
    q.add_argument("--force", action="store_true", help="replace an existing output directory (atomically)")
    q.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    q.add_argument("--strict", action="store_true", help="refuse [[overrides]] layer patterns that match no layer (default: warn)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    q.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("simulate", help="run the integer simulator and verify a manifest")
    s.add_argument("dir")
    s.add_argument("--data", default="samples:eval")
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--accumulator", choices=("exact", "wrap", "saturate"))
    s.add_argument("--accumulator-bits", type=int, help="override every layer's accumulator width P")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    s.set_defaults(fn=cmd_simulate)

    e = sub.add_parser("eval", help="fidelity of a manifest against its FP32 model")
    e.add_argument("dir")
    e.add_argument("--data", default="samples:eval")
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--backend", default="sim", choices=("sim", "fakequant", "onnxruntime", "onnxruntime-int"),
                   help="onnxruntime runs the QDQ twin (float semantics), onnxruntime-int the integer twin (bit-exact)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--model", help="the FP32 model to compare against, as for quantize; needed when the manifest's "
                                   "model is code (a factory or a model file), checked against its recorded hashes")
    e.add_argument("--weights", help="state dict for --model (default: the weights file the manifest records)")
    e.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("recipes", help="list built-in recipes (and with --keys every recipe key)")
    r.add_argument("--keys", action="store_true")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_recipes)

    x = sub.add_parser("export", help="export a manifest as ONNX (QDQ for onnxruntime, QONNX, or the bit-exact integer "
                                      "twin) or its encodings as AIMET encodings JSON (for Qualcomm's QNN/SNPE)")
    x.add_argument("dir")
    x.add_argument("--format", default="qdq", choices=("qdq", "qonnx", "int", "aimet"))
    x.add_argument("--out", help="output file (default DIR/model.onnx, model.qonnx.onnx, model.int.onnx or model.encodings)")
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", help="summarise a manifest directory or an exported model.onnx")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("card", help="print the quantization card of a manifest directory")
    c.add_argument("dir")
    c.set_defaults(fn=cmd_card)

    w = sub.add_parser("sweep", help="fidelity vs mean weight bits of recipes over budgets (PNG + JSON)")
    w.add_argument("model", help="as for quantize")
    w.add_argument("--recipe", action="append", help="recipe to sweep (repeatable; default w4a8); needs a budget_key")
    w.add_argument("--budgets", default="3,4,5,6,8", help="comma-separated mean weight bits, e.g. 3,3.5,4,5,6,8")
    w.add_argument("--calib", default="samples")
    w.add_argument("--calib-size", type=int)
    w.add_argument("--eval-size", type=int, default=64)
    w.add_argument("--data", help="held-out evaluation data (default: held-out sample photos)")
    w.add_argument("--weights", help="state dict file, or 'random'")
    w.add_argument("--input-shape", help="per-sample input shape for models without a known one")
    w.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    w.add_argument("--peers", help="JSON of peer points to overlay (e.g. benchmarks.run --out-json)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", help="output directory (default ptq-out/MODEL-sweep)")
    w.add_argument("--json", action="store_true")
    w.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    w.set_defaults(fn=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(getattr(args, "quiet", False))
    reuse_freed_memory()  # this process is ptq's own: its allocator may be tuned for tensors
    try:
        return args.fn(args)
    except PtqError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]; no output was written")
        return 130
    except Exception as exc:  # an internal error: a bug in ptq
        if args.debug:
            raise
        console.print(f"[red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')} (run with --debug for the traceback)",
                      soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
