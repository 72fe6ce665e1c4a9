"""Output places: `--force` replaces only ptq outputs, concurrent writers never lose output
silently, user strings print literally, and a failed write is one line naming the path with the
previous output intact and no hidden temporary left behind."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import ptq
from ptq.cli import main
from ptq.errors import OutputError
from ptq.manifest import MANIFEST_FILE, TENSOR_FILE, load, save

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.reliability import tiny, tree_digest  # noqa: E402  (needs ROOT on the path)


def cli(*argv: str) -> tuple[int, str]:
    """Exit code and the one stderr line of a failing command (asserted to be one line)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    assert code != 2 or (len(lines) == 1 and lines[0].startswith("error: ")), err.getvalue()
    return code, " ".join(lines)


def hidden(parent: Path) -> list[str]:
    """Entries a writer may have left beside its output (temporaries, moved-aside outputs, locks)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, its calibration tensor and one saved ptq output ("src")."""
    d = tmp_path_factory.mktemp("outputs")
    torch.save(tiny(), d / "tiny.pt")
    x = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    np.save(d / "calib.npy", x)
    ptq.quantize(tiny(), x, "w8a8", input_shape=(1, 8, 8), eval_data=x[:8]).save(d / "src")
    return d


def quantize_argv(files: Path, out: Path | str, *extra: str) -> list[str]:
    return ["quantize", "benchmarks.reliability:tiny", "--input-shape", "1,8,8", "--calib", str(files / "calib.npy"),
            "--out", str(out), *extra]


def writer_outputs(files: Path, n: int) -> list:
    """n independent manifests (each save rewrites its manifest's tensor record)."""
    return [load(files / "src") for _ in range(n)]


# ---------------------------------------------------------------- item 3: what --force may replace

def test_force_refuses_a_directory_that_is_not_a_ptq_output(files, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    shutil.copy(files / "calib.npy", user / "calib.npy")
    (user / MANIFEST_FILE).write_text('{"format": "something-else"}')
    user.chmod(0o751)
    before = tree_digest(user)
    code, msg = cli(*quantize_argv(files, user, "--force"))
    assert code == 2 and str(user) in msg and "not a ptq output" in msg
    with pytest.raises(OutputError, match="not a ptq output"):
        save(load(files / "src"), user, force=True)
    assert tree_digest(user) == before and stat.S_IMODE(user.stat().st_mode) == 0o751
    assert hidden(tmp_path) == []


def test_force_replaces_a_ptq_output_and_keeps_its_mode(files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(files / "src", out)
    (out / "stale.txt").write_text("from an older run")
    out.chmod(0o750)
    save(load(files / "src"), out, force=True)
    assert load(out) and not (out / "stale.txt").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert hidden(tmp_path) == []


def test_an_empty_existing_directory_is_used_and_keeps_its_mode(files, tmp_path):
    out = tmp_path / "made-by-user"
    out.mkdir()
    out.chmod(0o711)
    save(load(files / "src"), out)
    assert load(out) and stat.S_IMODE(out.stat().st_mode) == 0o711


@pytest.mark.parametrize("where", [".", "..", "cwd-empty"])
def test_out_refuses_the_current_directory_and_its_ancestors(files, tmp_path, monkeypatch, where):
    cwd = tmp_path / "work"
    cwd.mkdir()
    if where != "cwd-empty":
        (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    out = "." if where == "cwd-empty" else where
    before = tree_digest(tmp_path)
    code, msg = cli(*quantize_argv(files, out, "--force"))
    assert code == 2 and f"output directory {out} is or contains the current directory" in msg
    assert tree_digest(tmp_path) == before and cwd.is_dir() and hidden(cwd) == []


def test_out_refuses_a_ptq_output_that_holds_an_input(files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(files / "src", out)
    shutil.copy(files / "calib.npy", out / "calib.npy")
    before = tree_digest(out)
    code, msg = cli("quantize", "benchmarks.reliability:tiny", "--input-shape", "1,8,8", "--calib", str(out / "calib.npy"),
                    "--out", str(out), "--force")
    assert code == 2 and f"output directory {out} is or contains the input {out / 'calib.npy'}" in msg
    assert tree_digest(out) == before


def test_out_an_existing_file_is_refused_without_a_temporary(files, tmp_path):
    target = tmp_path / "result"
    target.write_text("a file of the user's")
    code, msg = cli(*quantize_argv(files, target, "--force"))
    assert code == 2 and f"output path {target} is a file, not a directory" in msg
    assert target.read_text() == "a file of the user's" and hidden(tmp_path) == []


# ---------------------------------------------------------------- item 4: concurrent writers

def _race(files: Path, out: Path, force: bool) -> tuple[list, list[Exception]]:
    """Three saves that all pass the up-front check, then publish at once (a barrier inside the
    write); each writes its index into two files, so a mixed directory would show."""
    n = 3
    barrier = threading.Barrier(n, timeout=60)
    wins, errors = [], []

    def marker(i: int):
        def render() -> bytes:
            barrier.wait()
            return str(i).encode()
        return render

    def run(i: int, m) -> None:
        try:
            save(m, out, {"a.txt": marker(i), "b.txt": str(i).encode()}, force=force)
            wins.append(i)
        except Exception as exc:  # noqa: BLE001  (the test inspects every outcome)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(writer_outputs(files, n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return wins, errors


def test_concurrent_saves_without_force_exactly_one_wins(files, tmp_path):
    out = tmp_path / "out"
    wins, errors = _race(files, out, force=False)
    assert len(wins) == 1 and len(errors) == 2, (wins, errors)
    for exc in errors:
        assert isinstance(exc, OutputError) and str(out) in str(exc) and "--force" in str(exc)
    assert load(out)
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text() == str(wins[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_forced_saves_each_leave_a_complete_directory(files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(files / "src", out)
    wins, errors = _race(files, out, force=True)
    assert sorted(wins) == [0, 1, 2] and errors == []
    assert load(out) and (out / "a.txt").read_text() == (out / "b.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- item 7: markup in user strings

@pytest.mark.parametrize("name", ["x[/].npy", "[bold]x[/bold].npy", "a[/]b[bold].npy"])
def test_markup_in_a_path_is_printed_literally(files, tmp_path, name):
    calib = tmp_path / "data" / name
    code, msg = cli("quantize", "benchmarks.reliability:tiny", "--input-shape", "1,8,8", "--calib", str(calib),
                    "--out", str(tmp_path / "o"))
    assert code == 2 and f"'{calib}' does not exist" in msg
    target = tmp_path / f"out{name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("")
    code, msg = cli(*quantize_argv(files, target))
    assert code == 2 and f"output path {target} is a file" in msg


# ---------------------------------------------------------------- long tail: failing writes

def _raise_on(monkeypatch, owner, attr: str, code: int, when=lambda *a: True) -> None:
    orig = getattr(owner, attr)

    def failing(*args, **kwargs):
        if when(*args):
            raise OSError(code, os.strerror(code))
        return orig(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)


def test_full_disk_during_quantize_keeps_the_previous_output(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(files / "src", out)
    before = tree_digest(out)
    _raise_on(monkeypatch, Path, "write_text", errno.ENOSPC, lambda p, *a: p.name == MANIFEST_FILE)
    code, msg = cli(*quantize_argv(files, out, "--force"))
    assert code == 2 and f"cannot write output directory {out}: no space left on device; free disk space" in msg
    assert tree_digest(out) == before and hidden(tmp_path) == []


def test_read_only_file_system_is_one_error_naming_the_directory(files, tmp_path, monkeypatch):
    out = tmp_path / "new"
    _raise_on(monkeypatch, os, "mkdir", errno.EROFS, lambda p, *a: Path(p).parent == tmp_path)
    with pytest.raises(OutputError, match=rf"cannot write output directory {out}: read-only file system; choose a writable"):
        save(load(files / "src"), out)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_export_keeps_the_previous_file(files, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(files / "src", src)
    before = (src / "model.onnx").read_bytes()
    _raise_on(monkeypatch, os, "fsync", errno.ENOSPC)
    code, msg = cli("export", str(src), "--format", "int", "--out", str(src / "model.onnx"))
    assert code == 2 and f"cannot write output file {src / 'model.onnx'}: no space left on device" in msg
    assert (src / "model.onnx").read_bytes() == before and hidden(src) == []


def test_export_out_an_existing_directory_is_refused(files, tmp_path):
    target = tmp_path / "somewhere"
    target.mkdir()
    code, msg = cli("export", str(files / "src"), "--out", str(target))
    assert code == 2 and f"output path {target} is a directory; give a file name such as {target / 'model.onnx'}" in msg
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("name,content,message", [
    ("missing.onnx", None, "does not exist"),
    ("garbage.onnx", b"\xff\xfe not protobuf at all \x00\x01", "is not an ONNX model"),
    ("empty.onnx", b"", "is not an ONNX model"),
    ("notes.txt", TENSOR_FILE.encode(), "is not an ONNX model"),
])
def test_inspect_a_missing_or_non_onnx_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, msg = cli("inspect", str(path))
    assert code == 2 and f"{path} {message}" in msg


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_get_the_modes_of_the_users_umask(files, tmp_path, umask):
    """As mkdir and a plain write would make them: not 0700/0600 from a private temporary."""
    old = os.umask(umask)
    try:
        out = ptq.load(files / "src").save(tmp_path / "new" / "out")  # manifest, tensors, card, report, plots, ONNX
        code, msg = cli("export", str(out), "--format", "int", "--out", str(tmp_path / "int.onnx"))
    finally:
        os.umask(old)
    assert code == 0, msg
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(out.parent.stat().st_mode) == 0o777 & ~umask
    files_made = sorted(out.iterdir()) + [tmp_path / "int.onnx"]
    assert {"card.md", "model.onnx", "bits.png", MANIFEST_FILE, TENSOR_FILE} <= {p.name for p in files_made}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files_made} == {p.name: 0o666 & ~umask for p in files_made}


@pytest.mark.parametrize("fmt", ["qdq", "int"])
def test_onnx_export_replaces_only_an_onnx_file_ptq_wrote(digits_quantized, tmp_path, fmt):
    foreign = tmp_path / "model.onnx"
    foreign.write_bytes(b"someone else's model")
    code, msg = cli("export", str(digits_quantized[1]), "--format", fmt, "--out", str(foreign))
    assert code == 2 and f"output file {foreign} exists and is not an ONNX file written by ptq" in msg
    assert foreign.read_bytes() == b"someone else's model"
    mine = tmp_path / "mine.onnx"
    for _ in range(2):  # ptq's own export is replaced
        assert cli("export", str(digits_quantized[1]), "--format", fmt, "--out", str(mine))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx", "model.onnx"]
