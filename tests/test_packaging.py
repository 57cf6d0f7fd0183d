"""Packaging guard rails: the wheel holds only seqedit/**, and the top-level folders are not importable by their own
names once installed (they are `seqedit.editors`, `seqedit.downstream`, `seqedit.analysis`)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, cwd=out,
    )
    (whl,) = out.glob("seqedit-*.whl")
    return whl


def test_wheel_contains_only_seqedit(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"seqedit", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for module in ("seqedit/editors/base.py", "seqedit/downstream/__init__.py", "seqedit/analysis/__init__.py",
                   "seqedit/configs/default.yaml", "seqedit/py.typed"):
        assert module in names, module
    # the shipped default config is the real file, not a dangling link
    text = zipfile.ZipFile(wheel).read("seqedit/configs/default.yaml").decode()
    assert "world:standard" in text
    # the shipped worlds: every file their checksums list, byte for byte, and nothing else under shipped/
    shipped = [n for n in names if n.startswith("seqedit/world/shipped/")]
    expected = set()
    for ck in (ROOT / "seqedit/world/shipped").glob("*/checksums.json"):
        preset = ck.parent.name
        listed = json.loads(ck.read_text())["files"]
        expected |= {f"seqedit/world/shipped/{preset}/{rel}" for rel in [*listed, "checksums.json"]}
        data = zipfile.ZipFile(wheel).read(f"seqedit/world/shipped/{preset}/model.safetensors")
        assert hashlib.sha256(data).hexdigest() == listed["model.safetensors"]
    assert "seqedit/world/shipped/standard/model.safetensors" in expected
    assert set(shipped) == expected, set(shipped) ^ expected
    size = wheel.stat().st_size
    assert size < 40e6, f"wheel is {size / 1e6:.1f} MB"


def test_top_level_names_are_not_importable(tmp_path):
    for name in ("editors", "downstream", "analysis"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (name, proc.stderr)
    proc = subprocess.run([sys.executable, "-c", "import seqedit.editors, seqedit.downstream, seqedit.analysis"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_package_folder_is_declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    remap = {v: k for k, v in cfg["package-dir"].items()}
    declared = set(cfg["packages"])
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", "bench", "build", ".venv", "runs"} or any(p.startswith(".") for p in rel.parts):
            continue
        top = remap.get(rel.parts[0], rel.parts[0])
        found.add(".".join((top, *rel.parts[1:])))
    assert found == declared, (found ^ declared)
