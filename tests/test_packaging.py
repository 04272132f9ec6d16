"""The package as users get it: version metadata, and a wheel that installs and imports outside the source tree."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest

import hf_semisparse

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args[:4]} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def project_table() -> dict:
    """`version` and `license` of pyproject.toml's [project] table (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    return {
        key: re.search(rf'^{key} = "([^"]*)"', text, flags=re.M).group(1) for key in ("version", "license")
    }


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    assert hf_semisparse.__version__ == version("hf-semisparse") == project_table()["version"]


def test_license_is_an_spdx_expression():
    # a `{text = ...}` table is deprecated by setuptools (PEP 639) and warns on every build
    assert project_table()["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_environment(tmp_path):
    """Build the wheel, install it into a new venv and import it from there (not from src/).

    The new venv gets the wheel only; its dependencies (torch, transformers...) are read from this environment
    through a path file, so the check needs no network. `.ci/check_wheel` does the full version with the
    dependencies resolved by pip in a clean venv.
    """
    start = time.monotonic()
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, ROOT])
    (wheel,) = dist.glob("hf_semisparse-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "hf_semisparse/kernels/csrc/sm90_sparse_gemm.cu" in names
    assert "hf_semisparse/model_cards/sparse_24.md" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert f"Version: {project_table()['version']}" in metadata

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    # without PYTHONPATH: a source tree on it (src/, with its egg-info) would count as already installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], env=env)
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # appended after the venv's own site-packages: the wheel's copy of hf_semisparse wins
    Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = (
        "import hf_semisparse, importlib.resources as r; "
        "print(hf_semisparse.__file__); print(hf_semisparse.__version__); "
        "print(r.files('hf_semisparse').joinpath('model_cards/sparse_24.md').is_file())"
    )
    out = run([python, "-c", code], cwd=tmp_path, env=env)
    file, version, card = out.stdout.split()
    assert file.startswith(purelib), f"imported {file}, not the installed wheel"
    assert version == project_table()["version"]
    assert card == "True"
    assert "build-kernels" in run([env_dir / "bin" / "hf-semisparse", "--help"], cwd=tmp_path, env=env).stdout
    print(f"wheel built, installed and imported in {time.monotonic() - start:.1f} s")
