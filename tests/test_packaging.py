"""The wheel is complete: it carries the shipped patterns, and the installed package (its demo and eval defaults
included) finds them from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the sources (so the build leaves nothing in the worktree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "duoattn", src / "duoattn", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(src)],
        check=True, env=env, capture_output=True,
    )
    (built,) = (tmp / "dist").glob("duoattn-*.whl")
    return built


def test_the_wheel_carries_every_shipped_pattern_file_unchanged(wheel):
    shipped = [p for p in (ROOT / "duoattn" / "patterns").rglob("*") if p.is_file()]
    assert any(p.name == "full_attention_heads.tsv" for p in shipped)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in shipped:
            member = path.relative_to(ROOT).as_posix()
            assert member in names, f"{member} is missing from {wheel.name}"
            assert zf.read(member) == path.read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "duoattn = duoattn.cli:main" in zf.read(entry_points).decode()


def test_the_installed_wheel_finds_its_patterns_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, env=env, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import duoattn; from duoattn import HeadPattern; from duoattn.shipped import shipped_pattern_dir\n"
        "p = HeadPattern.from_pretrained('SmolLM2-135M-Instruct')\n"
        "from duoattn.eval.harness import EvalConfig\n"
        "print(duoattn.__file__); print(shipped_pattern_dir('SmolLM2-135M-Instruct')); print(p.shape)\n"
        "print(EvalConfig(out_dir='runs/x').pattern_dir())"  # the default of duoattn eval
    )
    env["PYTHONPATH"] = str(site)  # the installed copy only: not the worktree, not the editable install
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert all(Path(line).is_relative_to(site) for line in (out[0], out[1], out[3]))
    assert out[2] == "(30, 3)"
