"""The shape of the code: layers, one JSON library, the design notes' map, the wheel.

Each rule here once drifted: ``schemas`` imported its error from ``core``,
three JSON libraries were in use, ``docs/DESIGN.md`` described an older
calling convention, and the wheel installed ``core``, ``schemas``,
``workers`` and ``bench`` as top-level packages.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tierpool.core.scripts import POOL_ARGS, PRELUDE_ARGS, PRELUDE_KEYS

DESIGN = (ROOT / "docs" / "DESIGN.md").read_text()
SUBPACKAGES = sorted(p.name for p in (ROOT / "tierpool").iterdir() if p.is_symlink())
"""The repository folders linked into the ``tierpool`` package."""


def modules() -> list[Path]:
    """Every Python module of the installed package, as a path under the repository."""
    out = sorted((ROOT / "tierpool").glob("*.py"))
    for name in SUBPACKAGES:
        out += sorted((ROOT / name).rglob("*.py"))
    return [p.relative_to(ROOT) for p in out]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports too)."""
    tree = ast.parse((ROOT / path).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("schemas", ("core", "workers", "client", "gateway", "kube", "connect", "bench")),
        ("core", ("workers", "client", "gateway", "kube", "connect", "bench")),
        ("client", ("workers", "gateway", "kube", "bench")),
    ],
)
def test_each_layer_imports_only_the_layers_below(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        str(path): sorted(
            m for m in imports(path) if m.split(".")[:2] in (["tierpool", f] for f in forbidden)
        )
        for path in modules()
        if path.parts[0] == layer
    }
    assert not {p: m for p, m in bad.items() if m}


def test_one_json_library() -> None:
    """msgspec.json everywhere; the stdlib parser only where msgspec cannot do the job
    (repeated keys in a tier config; Go's first-value-only body reading)."""
    stdlib_ok = {Path("core/tierconfig.py"), Path("gateway/formats.py")}
    for path in modules():
        found = imports(path)
        assert "orjson" not in found, f"{path} imports orjson: use msgspec.json"
        if "json" in found:
            assert path in stdlib_ok, f"{path} imports json: use msgspec.json"


def test_design_map_names_every_module_and_only_those() -> None:
    listed = set(re.findall(r"^- `([\w/]+\.py)` — ", DESIGN, re.M))
    have = {str(p) for p in modules()}
    assert have - listed == set(), "add a line per module to docs/DESIGN.md 'Where to find things'"
    assert listed - have == set(), "docs/DESIGN.md names modules that do not exist"


def test_design_calling_convention_matches_the_code() -> None:
    keys = re.findall(r"^KEYS\[(\d+)\]\s+(\w+)\s", DESIGN, re.M)
    args = re.findall(r"^ARGV\[(\d+)\]\s+(\w+)\s", DESIGN, re.M)
    assert [(int(i), n) for i, n in keys] == [
        (i, name) for i, (name, _) in enumerate(PRELUDE_KEYS, 1)
    ]
    assert [(int(i), n) for i, n in args] == [(i, name) for i, name in enumerate(PRELUDE_ARGS, 1)]
    assert f"ARGV[{len(PRELUDE_ARGS) + 1}] = n pools, then {len(POOL_ARGS)} per pool" in DESIGN
    assert f"KEYS[{len(PRELUDE_KEYS) + 1} + 2i]" in DESIGN


@pytest.mark.slow
def test_the_wheel_holds_only_the_tierpool_package(tmp_path: Path) -> None:
    """Installed, nothing generic (core, schemas, workers, bench) lands in site-packages.

    Built from a copy of the tree, so files a previous build left in ``build/``
    cannot end up in this wheel.
    """
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("tierpool-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tierpool"}, tops
    for sub in SUBPACKAGES:
        assert f"tierpool/{sub}/__init__.py" in names, sub
    lua = {Path(n).name for n in names if n.startswith("tierpool/core/lua/")}
    assert lua == {p.name for p in (ROOT / "core" / "lua").glob("*.lua")}
    assert "tierpool/py.typed" in names
