"""The distribution installs exactly one top-level package, `ptq`, with calib and the recipes inside."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_ptq_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ptq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ptq", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for f in ("ptq/calib/collect.py", "ptq/recipes/w8a8.toml", "ptq/recipes/multipoint.toml", "ptq/manifest/schemes.py"):
        assert f in names
    assert not any(n.startswith(("calib/", "recipes/", "tests/", "benchmarks/")) for n in names)


def test_recipes_load_as_package_data():
    from ptq.recipe import builtin_names
    on_disk = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))
    assert builtin_names() == on_disk
