"""The Python API; the command line is a thin shell over it.

    qm = ptq.quantize("efficientnet_lite0", "samples", recipe="w8a8")
    qm.save("out/")
    y = ptq.load("out/").simulate(x)      # float inputs (N,C,H,W) -> dequantized integer outputs

`check_output(dir, force)` refuses an output place up front, before a long run.
"""
from __future__ import annotations

import difflib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from rich.markup import escape

from . import bitserial
from .biascorrect import choose_and_correct
from .calib.collect import Statistics, collect_statistics
from .calib.distributed import helper_rank, launched, ranks  # noqa: F401  (launched: the CLI asks which rank it is)
from .calib.preprocess import Preprocess
from .calib.progress import console, muted, note, progress, stage
from . import minilm
from .calib.sources import DataSource, check_float_dtype, check_labels, float_samples, open_source, sample_shape, shape_mismatch
from .card import bits_png, planes_png, render_card
from .determinism import platform_record
from .errors import DataError, ModelError, PtqError, RecipeError
from .ir import Graph, LayerWeights
from .ir.capture import capture
from .manifest import Manifest, load as load_manifest, save as save_manifest, weight_summary
from .manifest.build import build_manifest
from .manifest.header import SENTENCE_EMBEDDING_KINDS
from .memory import release_freed_memory, reuse_freed_memory
from .manifest.publish import check_output  # noqa: F401  (API: refuse an output place before a long run)
from .methods import METHODS
from .methods.selectors import is_structural, override_matches, select
from .methods.rounding import apply_rounding
from .metrics import embedding_fidelity, fidelity, sentence_embeddings
from .models import LoadedModel, check_finite, load_model, rebuild, spec_kind, supplied
from .recipe import BASE_SCHEMA, resolve
from .runtime import ACC_MODES, Codec, Simulator, run_reference, run_verification
from .runtime.verify import end_to_end_text  # noqa: F401  (API: level 2's end-to-end figure in words, for the CLI)
from .version import __version__


def _preprocess(spec: dict) -> Preprocess | None:
    """The model's image preprocessing, cropping to its input size (also for manifests written before
    the recorded preprocessing followed the input shape)."""
    p = spec.get("preprocess")
    return None if p is None else Preprocess.from_dict(p).fitted(tuple(spec["input_shape"]))


def as_source(data: Any, spec: dict, n: int | None, seed: int, split: str) -> DataSource:
    """Accept a source spec string, a DataSource, an in-memory array/tensor (N, C, H, W), or a pair
    (samples, labels) of them with one integer class index per sample."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, tuple):
        if len(data) != 2:
            raise DataError(f"in-memory data as a tuple must be (samples, labels); got a tuple of {len(data)}")
        x, labels = data
        src = as_source(x, spec, n, seed, split)
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        src.labels = check_labels(labels, len(x), "the data")[:src.count]
        return src
    shape = tuple(spec["input_shape"])
    if spec.get("kind") in SENTENCE_EMBEDDING_KINDS and isinstance(data, (str, Path)) \
            and Path(data).suffix not in (".npy", ".npz", ".pt", ".pth"):
        tokenizer = minilm.WordPiece.from_folder(Path(spec["folder"])) if spec["kind"] == "bert" else None
        return minilm.sentence_source(str(data), split, n, shape[0], tokenizer)
    if isinstance(data, (str, Path)):
        pre = _preprocess(spec)
        if pre is None and Path(data).suffix not in (".npy", ".npz", ".pt", ".pth"):
            raise DataError("this model has no image preprocessing (an in-memory model): give "
                            f"--calib/--data a .npy/.pt tensor of shape (N, {', '.join(map(str, shape))})")
        return open_source(str(data), n, pre, shape, seed, split)
    if isinstance(data, torch.Tensor):
        check_float_dtype(data.dtype, "the data")
        data = data.detach().cpu()
        arr = (data.float() if data.dtype == torch.bfloat16 else data).numpy()
    else:
        arr = np.asarray(data)
        check_float_dtype(arr.dtype, "the data")
    if arr.ndim != 1 + len(shape) or tuple(arr.shape[1:]) != shape:
        raise shape_mismatch("the data", arr.shape, shape)
    if arr.shape[0] == 0:
        raise DataError("the data holds no samples")
    arr = float_samples(arr[:n] if n else arr, "the data")
    return DataSource("in-memory array", "tensor", arr.shape[0], lambda a, b: arr[a:b])


MAX_SEED = 2 ** 32 - 1  # numpy's Generator seeds and torch's generators agree on this range
MAX_INPUT_VALUES = 1 << 26  # per sample (256 MB of float32): beyond it the example alone exhausts memory


def check_count(value: Any, name: str, optional: bool = False) -> None:
    """A sample count or batch size: a positive integer (or None where the default is meant)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PtqError(f"{name} must be a positive integer; got {value!r}")


def check_eval_size(value: Any) -> None:
    """How many samples evaluation measures fidelity on: 0 skips the evaluation stage."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise PtqError(f"evaluation size (--eval-size / eval_size=) must be a non-negative integer (0 skips evaluation); got {value!r}")


VERIFY_MODES = ("sample", "full")  # level 2 on the recipe's calibration.verify_size first samples, or on all


def check_workers(value: Any) -> None:
    """Calibration processes on this machine: a positive integer, or None (torchrun's ranks if it
    started this process, else one)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise PtqError(f"workers (--workers) must be a positive integer, the number of calibration processes; got {value!r}")


def check_verify(mode: Any) -> None:
    if mode not in VERIFY_MODES:
        raise PtqError(f"verify (--verify) must be one of {', '.join(VERIFY_MODES)}; got {mode!r}")


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise PtqError(f"seed (--seed) must be an integer from 0 to {MAX_SEED}; got {seed!r}")


def check_input_shape(shape: Any) -> tuple[int, ...] | None:
    """A per-sample input shape such as (3, 224, 224): positive integers of a size one sample can have."""
    if shape is None:
        return None
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise PtqError(f"input shape (--input-shape / input_shape=) must be positive integers like 3,224,224; got {shape!r}")
    values = int(np.prod(dims, dtype=np.float64))
    if values > MAX_INPUT_VALUES:
        raise PtqError(f"input shape {dims} has {values:.3g} values per sample (more than {MAX_INPUT_VALUES:.3g}); "
                       "give the per-sample shape C,H,W without the batch dimension, e.g. 3,224,224")
    return tuple(int(d) for d in dims)


def check_accumulator(mode: str | None, bits: Any) -> None:
    """What-if accumulator settings: a known mode and a width the recipe's accumulator.bits allows."""
    if mode is not None and mode not in ACC_MODES:
        raise PtqError(f"accumulator mode must be one of {', '.join(ACC_MODES)}; got {mode!r}")
    f = BASE_SCHEMA["accumulator"]["bits"]
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not f.lo <= bits <= f.hi):
        raise PtqError(f"accumulator bits (--accumulator-bits) must be an integer from {f.lo:g} to {f.hi:g}; got {bits!r}")


def _split_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


class QuantizedModel:
    """A manifest plus what is needed to use it: simulate, evaluate, save."""

    def __init__(self, manifest: Manifest, model: torch.nn.Module | None = None,
                 report: dict | None = None, directory: Path | None = None):
        self.manifest = manifest
        self.model = model
        self.report = report or {}
        self.directory = directory
        self._sim: Simulator | None = None

    # -- execution --
    def simulate(self, x: Any, accumulator: str | None = None) -> np.ndarray:
        """Integer simulator outputs (dequantized, numpy) for float preprocessed inputs (N,C,H,W)."""
        t = torch.as_tensor(np.asarray(x, np.float32)) if not isinstance(x, torch.Tensor) else x.float()
        shape = tuple(self.manifest.graph["input_shape"])
        if t.dim() != 1 + len(shape) or tuple(t.shape[1:]) != shape:
            raise DataError(f"input has shape {tuple(t.shape)}; this model expects (N, {', '.join(map(str, shape))})")
        sim = Simulator(self.manifest, accumulator) if accumulator else (self._sim or Simulator(self.manifest))
        if not accumulator:
            self._sim = sim
        return sim(t)

    def fakequant(self, x: torch.Tensor) -> np.ndarray:
        out = self.manifest.graph["outputs"][0]
        q = run_reference(self.manifest, x.float())[out]
        return Codec(self.manifest).dequantize(q, out).numpy()

    def fp32_model(self, model: str | torch.nn.Module | None = None, *, weights: str | None = None,
                   trust_model_file: bool = False) -> torch.nn.Module:
        """The FP32 model the manifest is compared against. Without `model`, rebuilt from the
        manifest only where that runs no code (a torchvision name, the bundled EfficientNet-Lite0);
        a factory, a model file or an in-memory model must be supplied: `model` as a spec like
        `ptq quantize` takes (checked against the manifest's hashes; `weights` and
        `trust_model_file` as there) or an nn.Module (used as given: a module has no file hash)."""
        spec = self.manifest.data["model"]
        if isinstance(model, torch.nn.Module):
            self.model = model.eval()
        elif model is not None:
            self.model = supplied(spec, model, weights, trust_model_file)
        elif self.model is None:
            self.model = rebuild(spec)
        return self.model

    def evaluate(self, data: Any = "samples", n: int | None = 64, backend: str = "sim", seed: int = 0,
                 batch_size: int = 16, model: str | torch.nn.Module | None = None, weights: str | None = None,
                 trust_model_file: bool = False) -> dict:
        """Fidelity vs the FP32 model on `data` (held-out sample crops by default); `model`,
        `weights` and `trust_model_file` supply that model as in `fp32_model`."""
        check_count(n, "sample count (--size)", optional=True)
        check_count(batch_size, "batch_size")
        check_seed(seed)
        model = self.fp32_model(model, weights=weights, trust_model_file=trust_model_file)
        src = as_source(data, self.manifest.data["model"], n, seed, split="eval")
        run = {"sim": self.simulate, "fakequant": self.fakequant}.get(backend)
        if backend in ("onnxruntime", "onnxruntime-int"):
            from .export import onnxruntime_runner
            run = onnxruntime_runner(self.manifest, fmt="int" if backend == "onnxruntime-int" else "qdq")
        if run is None:
            raise DataError(f"unknown backend '{backend}'; use sim, fakequant, onnxruntime or onnxruntime-int")
        fps, qs, xs = [], [], []
        embeddings = self.manifest.data["model"].get("kind") in SENTENCE_EMBEDDING_KINDS  # mean pooling over the mask
        with torch.no_grad(), progress(f"evaluation ({backend}, batches)", -(-len(src) // batch_size)) as advance:
            for xb in src.batches(batch_size):
                fps.append(model(xb).numpy())
                if len(fps) == 1:
                    src.check_label_range(fps[0].shape[-1])
                qs.append(run(xb))
                advance()
                if embeddings:  # the token ids and mask (kept only where pooling needs them)
                    xs.append(xb.numpy())
        res = fidelity(np.concatenate(fps), np.concatenate(qs), src.labels)
        if embeddings:
            x = np.concatenate(xs)
            res.update(embedding_fidelity(sentence_embeddings(np.concatenate(fps), x), sentence_embeddings(np.concatenate(qs), x)))
        res.update(data=src.description, backend=backend)
        res.update({k: v for k, v in weight_summary(self.manifest).items() if k in ("mean_weight_bits", "model_bytes")})
        return res

    def verify(self, data: Any = "samples:eval", n: int | None = 32, seed: int = 0, accumulator: str | None = None,
               accumulator_bits: int | None = None) -> dict:
        """Verification levels 1-2 on `data` and each layer's accumulator behaviour (max |acc|,
        overflows, bit-serial cycles); `accumulator`/`accumulator_bits` override every layer's
        accumulator mode and width. The result's `verified` is the verdict `ptq simulate` exits on."""
        check_count(n, "sample count (--size)", optional=True)
        check_seed(seed)
        check_accumulator(accumulator, accumulator_bits)
        src = as_source(data, self.manifest.data["model"], n, seed, split="eval")
        res = run_verification(self.manifest, src.batches(8), accumulator, accumulator_bits)
        res["data"] = src.description
        return res

    def summary(self) -> dict:
        """What `ptq inspect` shows: provenance, mean bits and bytes, and one row per weighted layer."""
        m = self.manifest
        ws = weight_summary(m)
        layers = [{"name": op["name"], "kind": op["kind"], "scheme": op["weight"]["scheme"],
                   "bits": op["weight"]["bits"], "bits_per_weight": op["weight"]["bits_per_weight"],
                   "shape": op["weight"]["shape"], "input_bits": m.encoding(op["inputs"][0])["bits"],
                   "accumulator_bits": op["accumulator"]["bits"], "data_free_bits": op["accumulator"]["data_free_bits"],
                   "bias_corrected": op["bias"]["corrected"]} for op in m.weighted_ops()]
        return {"model": m.data["model"]["name"], "recipe": m.data["recipe"]["name"], "version": m.data["version"],
                "created_by": m.data["created_by"], "ops": len(m.ops), "mean_weight_bits": ws["mean_weight_bits"],
                "model_bytes": ws["model_bytes"], "layers": layers, "verification": m.data.get("verification")}

    def export_onnx(self, path: str | Path, format: str = "qdq") -> Path:
        """Write the QDQ (onnxruntime), QONNX or integer (`int`, bit-exact in onnxruntime) twin atomically."""
        from .export import export, save_onnx
        return save_onnx(export(self.manifest, format), path)

    def export_aimet(self, path: str | Path) -> Path:
        """Write the encodings as AIMET encodings JSON (version 0.6.1) keyed by the QDQ export's tensor
        names, atomically; an existing file is replaced only if ptq wrote it. Multi-term (multipoint)
        layers are refused: they have no AIMET encoding."""
        from .export import save_aimet
        return save_aimet(self.manifest, path)

    # -- persistence --
    def card(self) -> str:
        r = self.report
        return render_card(self.manifest, r.get("fidelity"), self.manifest.data.get("verification"),
                           (r.get("verification") or {}).get("level2"), "fidelity" in r and r["fidelity"] is None)

    def save(self, directory: str | Path, force: bool = False, protect: Iterable[str | Path] = ()) -> Path:
        """Write the output directory atomically: refused if it exists (unless `force` and it is a
        ptq output), is a file or a foreign directory, or contains the current directory or a
        path in `protect` (the run's inputs)."""
        from .export import export_qdq
        extra = {"card.md": self.card().encode(), "report.json": (json.dumps(self.report, sort_keys=True, indent=1) + "\n").encode(),
                 "bits.png": bits_png(self.manifest),
                 "model.onnx": lambda: export_qdq(self.manifest).SerializeToString()}
        planes = planes_png(self.manifest)
        if planes is not None:
            extra["planes.png"] = planes
        self.directory = save_manifest(self.manifest, directory, extra_files=extra, force=force, protect=protect)
        return self.directory


@dataclass
class Prepared:
    """What quantization needs that no weight setting changes: the loaded model, its captured graph
    and the calibration statistics. One `prepare` serves many `quantize_prepared` calls (a sweep)."""

    model: LoadedModel
    graph: Any
    stats: Any
    source: DataSource
    recipe: dict
    seed: int
    eval_data: Any
    eval_size: int
    calibration_seconds: float
    seconds: float
    rank: int = 0  # this process's calibration rank: only rank 0 goes on to quantize
    ranks: int = 1  # how many processes collected the statistics


def _resolve(recipe: str | dict, overrides: dict[str, Any] | None, kw_overrides: dict[str, Any],
             calib_size: int | None) -> dict:
    all_over = dict(overrides or {})
    all_over.update(_split_overrides(kw_overrides))
    if calib_size is not None:
        all_over["calibration.size"] = calib_size
    return resolve(recipe, all_over)


def prepare(model: str | torch.nn.Module, calib: Any = "samples", recipe: str | dict = "w8a8", *,
            weights: str | None = None, calib_size: int | None = None, seed: int = 0,
            eval_data: Any = None, eval_size: int = 64, input_shape: tuple[int, ...] | None = None,
            trust_model_file: bool = False, workers: int | None = None, overrides: dict[str, Any] | None = None,
            **kw_overrides: Any) -> Prepared:
    """Load and capture `model` and collect its calibration statistics (the recipe's [calibration]).
    `trust_model_file` allows unpickling a saved module file (it runs code stored in the file).

    `workers=N` collects them in N processes on this machine (this one is rank 0; the model and the
    data must pickle: a spec, a path, an array or a module); under torchrun every rank calls this,
    and each streams its share of the calibration batches (`calib.distributed`). The statistics are
    the same bits as one process's; the result's `rank` says which process this is."""
    t0 = time.perf_counter()
    check_count(calib_size, "calibration size (--calib-size / calib_size=)", optional=True)
    check_eval_size(eval_size)
    check_seed(seed)
    check_workers(workers)
    input_shape = check_input_shape(input_shape)
    r = _resolve(recipe, overrides, kw_overrides, calib_size)
    if input_shape is None and (isinstance(model, torch.nn.Module) or spec_kind(model) in ("factory", "file")):
        input_shape = check_input_shape(sample_shape(calib))  # a model of the user's takes what its data holds
    if workers is not None and workers > 1 and isinstance(calib, DataSource):
        raise PtqError("workers= needs the calibration data as a path, an array or a tensor (a DataSource does not pickle)")
    helper = dict(model=model, calib=calib, recipe=recipe, weights=weights, calib_size=calib_size, seed=seed,
                  input_shape=input_shape, trust_model_file=trust_model_file, overrides=overrides, **kw_overrides)
    with ranks(workers, _helper, (helper,)) as shard:
        prep = _prepare(model, calib, r, weights, seed, eval_data, eval_size, input_shape, trust_model_file, shard)
    prep.seconds = time.perf_counter() - t0
    return prep


def _prepare(model, calib, r, weights, seed, eval_data, eval_size, input_shape, trust_model_file, shard) -> Prepared:
    """`prepare` on this rank: loading is agreed on by every rank before the statistics reduce."""
    t0 = time.perf_counter()
    with stage("load and capture"), shard.agreed():
        if isinstance(model, torch.nn.Module):
            shape = input_shape
            if shape is None:
                raise ModelError("give input_shape= (or calibration data as an array) for an in-memory model")
            check_finite(model, f"model {type(model).__name__}")
            lm = LoadedModel(model.eval(), {"name": type(model).__name__, "kind": "module", "weights": None,
                                             "seed": seed, "input_shape": list(shape), "preprocess": None})
        else:
            lm = load_model(model, weights, seed, input_shape, trust_model_file)
        cal = r["calibration"]
        src = as_source(calib, lm.spec, cal["size"], seed, split="calib")
        if len(src) < 16 and shard.rank == 0:
            console.print(f"[yellow]warning:[/] only {len(src)} calibration samples; statistics will be noisy (use 64 or more)")
        ev = None if eval_data is None or eval_size == 0 else as_source(eval_data, lm.spec, eval_size, seed, split="eval")
        graph = capture(lm.module, lm.input_shape)
        logits = graph.producers().get(graph.outputs[0])
        if ev is not None and logits is not None:  # before calibration, not after the whole run
            ev.check_label_range(int(np.prod(logits.attrs["out_shape"])))
    t_cal = time.perf_counter()
    with stage("statistics"):
        stats = collect_statistics(graph, src, cal["batch_size"], seed, cal["positions"], cal["sensitivity_samples"],
                                   shard, fisher_now=shard.world > 1 and METHODS[r["method"]].reads_fisher(r),
                                   grouped_positions=cal["grouped_positions"], moments=cal["layer_moments"],
                                   pre_act_rows=r["bias_correction"]["samples"], coherent=cal["sensitivity"] == "coherent")
    release_freed_memory()  # the fixed-point sums' integers
    t_stats = time.perf_counter() - t_cal
    return Prepared(lm, graph, stats, src, r, seed, ev, eval_size, t_stats, time.perf_counter() - t0, shard.rank, shard.world)


def _helper(index: int, world: int, port: int, threads: int, kwargs: dict) -> None:
    """A calibration rank that `workers=N` spawned: its share of the statistics, then exit (rank 0
    quantizes). A failure rank 0 reports (agreed on) exits with its code and prints nothing."""
    rank = index + 1
    reuse_freed_memory()  # a process of ptq's own, as the command line's
    try:
        with muted(), helper_rank(index, world, port, threads):
            prepare(**kwargs)
    except PtqError as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # lost touch with rank 0: it is gone or failed outside an agreed step
        console.print(f"[red]error:[/] calibration rank {rank}: {escape(f'{type(exc).__name__}: {exc}')}", soft_wrap=True)
        sys.exit(1)


class _StageClock:
    """Wall seconds of each named stage, for report.json (never the manifest: it stays byte-identical),
    with the stage's progress line (`calib.progress.stage`); what a stage freed goes back to the OS
    before the next one starts (`ptq.memory`)."""

    def __init__(self, before: dict[str, float]):
        self.seconds = dict(before)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        with stage(name.replace("_", " ")):
            yield
        release_freed_memory()
        self.seconds[name] = time.perf_counter() - t


# [calibration] keys that shape no statistic: a prepared model serves a recipe whatever they say
STAGE_KEYS = ("verify_size",)


def check_statistics_cover(prepared: dict, wanted: dict) -> None:
    """Refuse a recipe whose [calibration] asks for statistics other than the prepared ones. Statistics
    with the layer input moments serve a recipe that skips them (it reads none: `ptq.recipe`)."""
    differ = [k for k in wanted if k not in (*STAGE_KEYS, "layer_moments") and wanted[k] != prepared[k]]
    if differ:
        raise RecipeError(f"the recipe's [calibration] differs from the prepared statistics in "
                          f"{', '.join('calibration.' + k for k in differ)}; prepare again with it")
    if wanted["layer_moments"] and not prepared["layer_moments"]:
        raise RecipeError("the recipe reads the layer input moments, which the prepared statistics skipped "
                          "(calibration.layer_moments = false); prepare again with the recipe")


def quantize_prepared(prep: Prepared, recipe: str | dict | None = None,
                      overrides: dict[str, Any] | None = None, strict: bool = False,
                      verify: str = "sample", keep_statistics: bool = True) -> QuantizedModel:
    """Quantize a prepared model with `recipe` (default: the one it was prepared with) + overrides.

    The stages, in order: method → manifest → bias correction → verification → evaluation. The
    recipe's [calibration] must match the prepared one: statistics are not recollected. `strict`
    makes an [[overrides]] layer pattern that matches no layer an error (else a warning). `verify`
    sizes level 2 (`stage_verification`); evaluation is skipped when the prepared eval_size is 0.
    `keep_statistics=False` (the one-shot `quantize`) frees the layer input moments once the method
    has read them for the last time (before the rounding engine's walk, where it has one): on resnet50
    they are 0.47 GiB (held packed, `calib.packed`), and no later stage reads them."""
    check_verify(verify)
    t0 = time.perf_counter()
    if recipe is None:
        r = resolve({k: v for k, v in prep.recipe.items() if k != "name"}, overrides)
        r["name"] = prep.recipe["name"]
    else:
        r = resolve(recipe, overrides)
    check_statistics_cover(prep.recipe["calibration"], r["calibration"])
    clock = _StageClock({"load_and_capture": prep.seconds - prep.calibration_seconds,
                         "statistics": prep.calibration_seconds})
    with clock.stage("method"):
        weights = stage_method(prep.graph, prep.stats, r, strict, keep_statistics)
    with clock.stage("manifest"):
        m = stage_manifest(prep, r, weights)
    timings = weights.timings
    del weights  # the manifest holds the integers now, in their narrowest type
    release_freed_memory()  # the method's temporaries, before bias correction's feature maps stack on them
    with clock.stage("bias_correction"):
        m.data["bias_correction"] = stage_bias_correction(prep.graph, m, prep.source, r, prep.stats)
    with clock.stage("verification"):
        verdict = stage_verification(m, prep.source, r, verify)
        m.data["verification"] = {k: verdict[k] for k in ("structural", "numeric")}
    qm = QuantizedModel(m, prep.model.module)
    report: dict[str, Any] = {"recipe": r["name"], "method": r["method"], "model": prep.model.spec["name"],
                              "calibration_ranks": prep.ranks}
    report.update({k: v for k, v in weight_summary(m).items() if k != "layers"})
    report.update(timings)
    if prep.eval_size == 0:
        note("evaluation  skipped (--eval-size 0)")
        report["fidelity"], clock.seconds["evaluation"] = None, 0.0
    else:
        with clock.stage("evaluation"):
            report["fidelity"] = stage_evaluation(qm, prep)
    report["verification"] = verdict
    report["seconds"] = time.perf_counter() - t0 + prep.seconds
    report["stage_seconds"] = clock.seconds
    m.data["card"] = {k: v for k, v in report.items() if k in ("mean_weight_bits", "model_bytes", "recipe", "method")}
    qm.report = report
    return qm


def stage_method(graph: Graph, stats: Statistics, recipe: dict, strict: bool = False,
                 keep_statistics: bool = True) -> LayerWeights:
    """The recipe's method: integer weights per layer (plus what it records about itself), with their
    rounding re-decided by the rounding engine where the recipe asks for it. `keep_statistics=False`
    frees the layer input moments as soon as nothing reads them again: before the engine's walk over
    the model quantized so far where it has one, else at the end of the method."""
    check_override_patterns(graph, recipe, strict)
    out = METHODS[recipe["method"]].quantize(graph, stats, recipe)
    out = out if isinstance(out, LayerWeights) else LayerWeights(out, {})

    def moments_read() -> None:
        stats.layer_inputs = {}
        release_freed_memory()

    release = None if keep_statistics else moments_read
    apply_rounding(graph, stats, recipe, out, release)
    if release is not None:
        release()  # where the engine had no walk (or nothing to do): the method was the last reader
    return out


def check_override_patterns(graph: Graph, recipe: dict, strict: bool) -> None:
    """An [[overrides]] entry that selects no conv/linear layer of this graph changes nothing, and a
    name glob that matches no layer is likely a typo: a warning naming it (an error when `strict`),
    with the closest layer name. A structural selector that selects nothing beside others that do is
    no mistake (`depthwise` on a model without depthwise convs) and stays silent."""
    layers = [op.name for op in graph.weighted_ops()]
    for i, o in enumerate(recipe["overrides"]):
        found = select(graph, o["layers"])
        problems = []
        for pat, names in found.items():
            if not names and not is_structural(pat):
                close = difflib.get_close_matches(pat, layers, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"layers are {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}"
                problems.append(f"overrides[{i}] layer pattern '{pat}' matches no conv/linear layer of this model ({hint})")
        if not problems and not any(found.values()):
            problems.append(f"overrides[{i}] (layers {', '.join(o['layers'])}) selects no conv/linear layer of this model")
        for msg in problems:
            if strict:
                raise RecipeError(f"{msg}; fix the pattern or drop it")
            console.print(f"[yellow]warning:[/] {escape(msg)}; it changes nothing (--strict makes this an error)", soft_wrap=True)


def stage_manifest(prep: Prepared, recipe: dict, weights: LayerWeights) -> Manifest:
    """Activation encodings, integer biases, requantizers and bounds around the method's weights."""
    cal = recipe["calibration"]
    header = {"created_by": f"ptq {__version__}", "model": prep.model.spec,
              "calibration": {**prep.source.to_dict(), "seed": prep.seed, "batch_size": cal["batch_size"]},
              "platform": platform_record()}
    m = build_manifest(prep.graph, prep.stats, recipe, weights, header)
    if recipe["overrides"]:  # which layers each override selected, for the card (absent without overrides)
        m.data["override_matches"] = override_matches(prep.graph, recipe["overrides"])
    if weights.info:
        m.data["method_info"] = weights.info
    if "swis" in weights.info:  # the builder's bias fit may have lowered a layer's cycles: totals follow the records
        weights.info["swis"].update(bitserial.totals({op["name"]: op["weight"] for op in m.weighted_ops()
                                                      if op["weight"]["scheme"] == "swis"}))
    return m


def stage_bias_correction(graph: Graph, m: Manifest, src: DataSource, recipe: dict, stats: Statistics) -> dict:
    """Empirical bias correction in the recipe's mode, measured on calibration samples, against the
    FP32 sums the statistics pass took where it took them over the same samples."""
    bc = recipe["bias_correction"]
    x = _head(src, bc["samples"])
    sums = stats.pre_act_sums if stats.pre_act_rows == len(x) else None
    return choose_and_correct(graph, m, x, bc["mode"], bc["choose_samples"], sums)


def stage_verification(m: Manifest, src: DataSource, recipe: dict, verify: str = "sample") -> dict:
    """Levels 1 (the loader's every check and the data-free bounds) and 2 (simulator vs reference),
    with overflows counted where a layer wraps or saturates: `verified`, the `reason` naming each
    failing check, `overflows`, `structural` and `numeric` (the manifest keeps the last two), and
    `level2` (how much was verified). Level 1 is data-free and always complete; level 2 runs on the
    first `calibration.verify_size` calibration samples (`sample`: a fixed, deterministic subset of
    bounded cost) or streams every calibration sample (`full`)."""
    if verify == "full":
        n, batches = len(src), src.batches(8)
    else:
        n = min(recipe["calibration"]["verify_size"], len(src))
        batches = list(_head(src, n).split(8))
    v = run_verification(m, batches)
    return {"verified": v["verified"], "reason": v["reason"], "overflows": v["overflows"],
            "structural": v["structural"], "numeric": _summary(v["numeric"]),
            "level2": {"mode": verify, "samples": v["numeric"]["samples"], "calibration_samples": len(src)}}


def stage_evaluation(qm: QuantizedModel, prep: Prepared) -> dict | None:
    """Fidelity against the FP32 model: on held-out data when there is some, else on the
    calibration data (and the report says so); None when the user skipped it (eval_size 0)."""
    if prep.eval_size == 0:
        return None
    if prep.eval_data is not None or prep.source.kind == "samples":
        ev = prep.eval_data if prep.eval_data is not None else "samples:eval"
        return qm.evaluate(ev, prep.eval_size, seed=prep.seed)
    res = qm.evaluate(prep.source, None, seed=prep.seed)
    res["data"] += " (calibration data, not held out)"
    return res


def quantize(model: str | torch.nn.Module, calib: Any = "samples", recipe: str | dict = "w8a8", *,
             weights: str | None = None, calib_size: int | None = None, seed: int = 0,
             eval_data: Any = None, eval_size: int = 64, input_shape: tuple[int, ...] | None = None,
             trust_model_file: bool = False, overrides: dict[str, Any] | None = None, strict: bool = False,
             verify: str = "sample", workers: int | None = None, **kw_overrides: Any) -> QuantizedModel | None:
    """Quantize `model` with `recipe` on calibration data; verify it; measure its fidelity.

    Overrides are recipe keys, as a dict ({"weights.bits": 4}) or keywords (weights__bits=4).
    A pickled module file is loaded only with `trust_model_file=True` (unpickling runs its code).
    `strict=True` refuses [[overrides]] layer patterns that match no layer (else a warning).
    `verify="full"` runs level 2 on every calibration sample instead of the fixed first
    `calibration.verify_size`; `eval_size=0` skips the evaluation stage.
    `workers=N` collects the statistics in N processes on this machine (`prepare`); under torchrun
    every rank calls this, and ranks other than 0 return None once the statistics are shared.
    """
    check_verify(verify)
    prep = prepare(model, calib, recipe, weights=weights, calib_size=calib_size, seed=seed, eval_data=eval_data,
                   eval_size=eval_size, input_shape=input_shape, trust_model_file=trust_model_file,
                   workers=workers, overrides=overrides, **kw_overrides)
    if prep.rank != 0:
        return None
    return quantize_prepared(prep, strict=strict, verify=verify, keep_statistics=False)


def _head(src: DataSource, n: int) -> torch.Tensor:
    xs, got = [], 0
    for xb in src.batches(min(n, 16)):
        xs.append(xb)
        got += xb.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]


def _summary(num: dict) -> dict:
    """Numeric verification without the per-tensor table (kept in the report, not the manifest)."""
    return {k: v for k, v in num.items() if k != "tensors"}


def load(directory: str | Path) -> QuantizedModel:
    """Load a saved manifest directory (validated) as a QuantizedModel."""
    d = Path(directory)
    m = load_manifest(d)
    report = {}
    rp = d / "report.json"
    if rp.is_file():
        try:
            report = json.loads(rp.read_text())
        except json.JSONDecodeError:
            report = {}
    return QuantizedModel(m, None, report, d)
