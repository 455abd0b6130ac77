"""What ``pip install tierpool`` gives a new user, checked in a fresh virtualenv.

The wheel is built from this tree and installed with its dependencies into
a new venv that has nothing else: one import package (``tierpool``) and no
generic top-level names, the console script, and ``tierpool run`` working
with no redis-server on PATH and no REDIS_URL (the fakeredis backend).
"""

from __future__ import annotations

import re
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, process_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheel, venv dir): the project's wheel installed into a new venv."""
    where = tmp_path_factory.mktemp("install")
    dist = where / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("tierpool-*.whl")
    env_dir = where / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=600,
    )
    yield wheel, env_dir


def test_wheel_installs_one_package(fresh_venv: tuple[Path, Path]) -> None:
    """Issue 11: nothing but ``tierpool`` lands in site-packages."""
    wheel, env_dir = fresh_venv
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        names = zf.namelist()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tierpool"}
    assert "tierpool/core/lua/allocate.lua" in names and "tierpool/py.typed" in names
    probe = (
        "import importlib.util as u, tierpool, tierpool.workers.worker;"
        "print([u.find_spec(n) for n in ('core', 'schemas', 'workers', 'bench', 'client')])"
    )
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", probe],
        cwd=env_dir,  # not the source tree, whose folders would be importable from cwd
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[None, None, None, None, None]"
    helped = subprocess.run(
        [str(env_dir / "bin" / "tierpool"), "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and "worker" in helped.stdout


def test_run_from_a_fresh_venv_without_redis_server(fresh_venv: tuple[Path, Path]) -> None:
    """Issue 17: ``pip install tierpool && tierpool run`` with no redis-server on
    PATH and no REDIS_URL exits 0 and shows allocations."""
    _wheel, env_dir = fresh_venv
    env = process_env()
    env.pop("PYTHONPATH", None)
    env["PATH"] = str(env_dir / "bin")  # the venv only: no redis-server
    done = subprocess.run(
        [str(env_dir / "bin" / "tierpool"), "run", "--duration", "10"],
        cwd=env_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert "using fakeredis" in out
    rates = [float(m) for m in re.findall(r"^\s*\d+s\s+([\d.]+) alloc/s", out, re.MULTILINE)]
    assert sum(1 for rate in rates if rate > 0) >= 3, out
    summary = re.search(r"stopped\. (\d+) allocated", out)
    assert summary is not None and int(summary[1]) > 10, out
