"""A manifest on disk: manifest.json plus tensors.safetensors in one directory, written atomically
and loaded only after every check passed. Never pickle: loading a manifest runs no code it names."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ManifestError, OutputError
from .format import FORMAT, MANIFEST_FILE, TENSOR_FILE, VERSION, Manifest, dumps
from .validate import validate


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(m: Manifest, directory: str | Path, extra_files: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write the manifest (and extra artefacts) to a temporary directory, then move it into place.

    An existing directory is refused unless `force`; with `force` it is replaced only after the
    new one is complete, so an interrupted run never leaves a half-written result.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists() and not force:
        raise OutputError(f"output directory {directory} already exists; pass --force to replace it or choose another --out")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        ordered = {k: m.tensors[k] for k in sorted(m.tensors)}
        save_file(ordered, str(tmp / TENSOR_FILE))
        m.data["tensors"] = {
            "file": TENSOR_FILE,
            "sha256": sha256_file(tmp / TENSOR_FILE),
            "entries": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in ordered.items()},
        }
        (tmp / MANIFEST_FILE).write_text(dumps(m.data))
        for name, blob in (extra_files or {}).items():
            # callables are rendered after the tensor hash is known (the ONNX twin embeds it)
            (tmp / name).write_bytes(blob() if callable(blob) else blob)
        if directory.exists() and _exchange(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        elif directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(directory: Path) -> None:
    """Tidy what a killed save of `directory` left: its temporary directory is removed; a previous
    output it had moved aside (non-Linux fallback, killed between the two renames) is restored."""
    pat = re.compile(rf"\.{re.escape(directory.name)}\.(tmp|old)-(\d+)(-.*)?")
    for p in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*-*")):
        m = pat.fullmatch(p.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not directory.exists():
            os.replace(p, directory)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE): `b` is never missing.
    False where unsupported, and the caller falls back to two renames."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def load(directory: str | Path) -> Manifest:
    """Load and validate a manifest directory; every problem is one ManifestError naming the field."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file


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
