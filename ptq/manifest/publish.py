"""Putting a finished output in place: the place is checked first (absent, empty, or a ptq output
that `force` may replace; never a file, a foreign directory, the current directory or a directory
holding the run's inputs), the output is written under a hidden temporary name beside it, and one
atomic rename publishes it. Without `force` the rename claims an absent name (renameat2
RENAME_NOREPLACE), so of concurrent writers exactly one wins; with `force` it swaps the previous
output out (RENAME_EXCHANGE). Decisions are serialized by a lock on the parent directory. An OSError
becomes an OutputError naming the output path, and the temporary is removed."""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import OutputError
from .format import FORMAT, MANIFEST_FILE

_FIXES = {errno.ENOSPC: "free disk space or choose another --out",
          errno.EDQUOT: "free disk space or choose another --out",
          errno.EROFS: "choose a writable --out",
          errno.EACCES: "choose a writable --out",
          errno.EPERM: "choose a writable --out"}


@contextmanager
def os_errors(path: Path, what: str = "output") -> Iterator[None]:
    """Turn an OSError inside the block into one OutputError line naming `path` and a fix."""
    try:
        yield
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        fix = _FIXES.get(exc.errno, "check that location or choose another --out")
        raise OutputError(f"cannot write {what} {path}: {reason}; {fix}") from exc


def _is_ptq_output(directory: Path) -> bool:
    """A quick look, not a load: manifest.json is a JSON object whose format is ptq's."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _place(directory: Path, force: bool, protect: Iterable[str | Path]) -> tuple[str, int]:
    """What stands at `directory` ("absent", "empty" or "ptq") and its mode; OutputError when it
    must not be replaced."""
    with os_errors(directory, "output directory"):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            return "absent", 0
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"output path {directory} is a symbolic link; give the directory itself or another --out")
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output path {directory} is a file, not a directory; choose another --out")
        real, cwd = directory.resolve(), Path.cwd()
        for inside in [cwd, *(Path(p) for p in protect)]:
            if inside.exists() and (inside.resolve() == real or real in inside.resolve().parents):
                what = "the current directory" if inside is cwd else f"the input {inside}"
                raise OutputError(f"output directory {directory} is or contains {what}; choose a new directory for --out")
        with os.scandir(directory) as it:
            if next(it, None) is None:
                return "empty", stat.S_IMODE(st.st_mode)
    if not _is_ptq_output(directory):
        raise OutputError(f"output directory {directory} holds files that are not a ptq output; "
                          "choose a new or empty directory for --out (--force replaces only ptq outputs)")
    if not force:
        raise OutputError(f"output directory {directory} already exists; pass --force to replace it or choose another --out")
    return "ptq", stat.S_IMODE(st.st_mode)


def check_output(directory: str | Path, force: bool = False, protect: Iterable[str | Path] = ()) -> None:
    """Refuse an output place before a long run (the publishing rename decides again, atomically)."""
    _place(Path(directory), force, protect)


@contextmanager
def staged_directory(directory: str | Path, force: bool = False,
                     protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `directory`; when the block finishes, publish it
    as `directory` in one atomic rename (see the module docstring). On any failure the temporary
    is removed and the previous output is untouched."""
    directory = Path(directory)
    protect = list(protect)
    _place(directory, force, protect)
    with os_errors(directory, "output directory"):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)  # umask-default mode, as a plain mkdir would give
    try:
        with os_errors(directory, "output directory"):
            yield tmp
            with _parent_locked(directory):
                _clean_stale(directory)
                state, mode = _place(directory, force, protect)
                _publish(tmp, directory, state, mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the previous output


def _publish(tmp: Path, directory: Path, state: str, mode: int) -> None:
    if state == "absent":
        if not _claim(tmp, directory):
            raise OutputError(f"output directory {directory} was created by another writer meanwhile; "
                              "pass --force to replace it or choose another --out")
        return
    os.chmod(tmp, mode)  # the replaced directory's mode carries over
    if state == "empty":
        try:
            os.rename(tmp, directory)  # rename(2) replaces an empty directory, never a non-empty one
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputError(f"output directory {directory} was filled by another program meanwhile; "
                              "choose another --out") from exc
    elif not _exchange(tmp, directory):
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        os.replace(old, tmp)


@contextmanager
def _parent_locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the parent directory: one publishing decision at a time, across
    threads and processes, and nothing left behind (the kernel drops the lock of a killed writer)."""
    import fcntl
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> int | None:
    """0, or the errno of Linux renameat2(a, b, flags); None where libc has no renameat2."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), flags) == 0:
        return 0
    return ctypes.get_errno()


def _claim(tmp: Path, directory: Path) -> bool:
    """Move `tmp` to the absent name `directory`; False if something is there now. Where
    RENAME_NOREPLACE is unsupported, rename(2) is exclusive too: it never replaces a non-empty
    directory (and a concurrent writer's directory is never empty)."""
    err = _renameat2(tmp, directory, _RENAME_NOREPLACE)
    if err == 0:
        return True
    if err == errno.EEXIST:
        return False
    if err not in (None, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err), str(directory))
    try:
        os.rename(tmp, directory)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            return False
        raise
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE): `b` is never missing.
    False where unsupported, and the caller falls back to three renames."""
    return _renameat2(a, b, _RENAME_EXCHANGE) == 0


def write_file(path: str | Path, blob: bytes, ours: Callable[[Path], bool] | None = None, what: str = "a file") -> Path:
    """Write one output file atomically (hidden temporary beside it, fsync, rename); an existing
    file keeps its mode, and with `ours` it is replaced only if `ours(path)` says ptq wrote it (`what`
    names the kind in the refusal). An OSError becomes an OutputError naming `path`; nothing is
    half-written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if ours is not None and path.is_file() and not ours(path):
        raise OutputError(f"output file {path} exists and is not {what} written by ptq; choose another --out or remove it")
    with os_errors(path, "output file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask-default mode
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    return path
