"""A manifest on disk: manifest.json plus tensors.safetensors in one directory, written atomically
and loaded only after every check passed. Never pickle: loading a manifest runs no code it names."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import ManifestError
from .format import FORMAT, MANIFEST_FILE, TENSOR_FILE, VERSION, Manifest, dumps
from .publish import staged_directory


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(m: Manifest, directory: str | Path, extra_files: dict[str, Any] | None = None, force: bool = False,
         protect: Iterable[str | Path] = ()) -> Path:
    """Write the manifest (and extra artefacts) to a temporary directory, then move it into place.

    The place must be absent, empty, or (with `force`) a previous ptq output, and must not contain
    a path in `protect` (the run's inputs) nor the current directory; concurrent writers never
    mix (see `publish`). An interrupted or failed run leaves the previous output as it was.
    """
    from safetensors.numpy import save as serialize

    directory = Path(directory)
    with staged_directory(directory, force, protect) as tmp:
        ordered = {k: m.tensors[k] for k in sorted(m.tensors)}
        # written by Python, not safetensors.save_file: a full disk is then an OSError (named as
        # such) rather than an opaque SafetensorError
        with open(tmp / TENSOR_FILE, "wb") as f:
            f.write(serialize(ordered))
        m.data["tensors"] = {
            "file": TENSOR_FILE,
            "sha256": sha256_file(tmp / TENSOR_FILE),
            "entries": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in ordered.items()},
        }
        (tmp / MANIFEST_FILE).write_text(dumps(m.data))
        for name, blob in (extra_files or {}).items():
            # callables are rendered after the tensor hash is known (the ONNX twin embeds it)
            (tmp / name).write_bytes(blob() if callable(blob) else blob)
    return directory


def read_data(directory: str | Path) -> dict[str, Any]:
    """manifest.json of a ptq output directory, checked only as far as its header (format,
    version): what reading its card needs. `load` checks the rest."""
    directory = Path(directory)
    mpath = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a manifest directory (run `ptq quantize ... --out {directory}` first)")
    if not mpath.is_file():
        raise ManifestError(f"{mpath} is missing; {directory} is not a ptq output directory")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{mpath} is not valid JSON ({exc})") from exc
    except RecursionError:
        raise ManifestError(f"{mpath} nests deeper than any manifest does (corrupt or hostile)") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath} must hold a JSON object")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{mpath}: field 'format' must be '{FORMAT}', got {data.get('format')!r}")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{mpath}: field 'version' must be a positive integer, got {version!r}")
    if version > VERSION:
        raise ManifestError(f"{mpath} has manifest version {version}; this ptq reads up to {VERSION}: upgrade ptq")
    return data


def load(directory: str | Path) -> Manifest:
    """Load and validate a manifest directory; every problem is one ManifestError naming the field."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .validation import validate  # its shape dry run needs torch; `read_data` does not

    directory = Path(directory)
    mpath = directory / MANIFEST_FILE
    data = read_data(directory)
    tinfo = data.get("tensors")
    if not isinstance(tinfo, dict) or not isinstance(tinfo.get("file"), str) or not isinstance(tinfo.get("sha256"), str):
        raise ManifestError(f"{mpath}: field 'tensors' must name the tensor file and its sha256")
    tname = tinfo["file"]
    if tname != TENSOR_FILE or "/" in tname:
        raise ManifestError(f"{mpath}: field 'tensors.file' must be '{TENSOR_FILE}' (pickled tensors are refused)")
    tpath = directory / tname
    if not tpath.is_file():
        raise ManifestError(f"tensor file {tpath} is missing")
    digest = sha256_file(tpath)
    if digest != tinfo["sha256"]:
        raise ManifestError(f"tensor file {tpath} does not match the sha256 recorded in manifest.json (corrupt or replaced)")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ManifestError(f"tensor file {tpath} cannot be read: {exc}") from exc
    m = Manifest(data, tensors)
    validate(m)
    return m
