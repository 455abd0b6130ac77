"""compose.yaml, Procfile, Dockerfile, Prometheus and Grafana files agree with the code.

Every ``tierpool`` command they run must parse with the real CLI, every
dashboard query must name metrics the workers export, and every file they
mount must exist. PyYAML is not a dependency, so the YAML files keep to a
small subset (block mappings and sequences, plain or double-quoted scalars,
JSON-style flow collections, full-line comments) that :func:`load_yaml`
reads; anything outside it fails here, on purpose.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import ROOT
from tierpool.gateway import metrics as gateway_metrics
from tierpool.workers import metrics
from tierpool.workers.cli import COMMANDS, build_parser

DEPLOY = ROOT / "deploy"


# --- a tiny YAML subset reader ----------------------------------------------------------


def load_yaml(text: str) -> Any:
    lines: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {n}: tab indentation")
        lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip()))
    value, end = _block(lines, 0, lines[0][0] if lines else 0)
    if end != len(lines):
        raise ValueError(f"unexpected indentation at {lines[end][1]!r}")
    return value


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _sequence(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
        item = lines[i][1][2:].strip()
        if _is_key(item):  # "- key: value": a mapping whose keys sit 2 columns further in
            sub = [(indent + 2, item), *lines[i + 1 :]]
            value, used = _mapping(sub, 0, indent + 2)
            out.append(value)
            i += used
        else:
            out.append(_scalar(item))
            i += 1
    return out, i


def _mapping(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, _, rest = lines[i][1].partition(":")
        if not _is_key(lines[i][1]):
            raise ValueError(f"not a 'key: value' line: {lines[i][1]!r}")
        key = key.strip().strip('"')
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        rest = rest.strip()
        i += 1
        if rest:
            out[key] = _scalar(rest)
        elif i < len(lines) and (
            lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))
        ):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
    return out, i


def _is_key(text: str) -> bool:
    return bool(re.match(r'^("[^"]+"|[A-Za-z0-9_.$-]+):(\s|$)', text))


def _scalar(text: str) -> Any:
    if text[0] in '[{"':
        return msgspec.json.decode(text)
    if " #" in text:
        raise ValueError(f"inline comment: {text!r}")
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None}.get(text, text)


def test_yaml_subset_reader() -> None:
    doc = load_yaml(
        'a:\n  b: 1\n  c: "x: y"\n  d: [1, "two"]\n  e:\n    - p\n    - q: 1\n      r: s\n'
        "  f:\n  - z\n# note\ng: {}\n"
    )
    assert doc == {
        "a": {"b": 1, "c": "x: y", "d": [1, "two"], "e": ["p", {"q": 1, "r": "s"}], "f": ["z"]},
        "g": {},
    }
    with pytest.raises(ValueError):
        load_yaml("a: 1 # comment\n")


# --- the files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml((ROOT / "compose.yaml").read_text())
    return doc


def _check_tierpool(argv: list[str]) -> None:
    """``tierpool ARGV`` parses with the real CLI and names a known subcommand."""
    assert argv and argv[0] in COMMANDS, f"unknown subcommand in tierpool {argv}"
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit as exc:  # argparse refuses: the file names a wrong option
        raise AssertionError(f"tierpool {' '.join(argv)}: does not parse") from exc


def docker_argv(command: list[str]) -> list[str]:
    """The argv Docker really runs: the image's ENTRYPOINT followed by ``command``.

    Regression (issue 14.1): compose said ``["tierpool", "worker"]`` on top of
    ``ENTRYPOINT ["tierpool"]``, so containers ran ``tierpool tierpool worker``.
    """
    text = (ROOT / "Dockerfile").read_text()
    (entry,) = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)
    return [*msgspec.json.decode(entry), *command]


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "worker", "pod-sim", "gateway", "prometheus", "grafana"}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[0] == "redis-server"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    redis_port = redis_cmd[redis_cmd.index("--port") + 1]

    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    for name in ("worker", "pod-sim", "gateway"):
        svc = services[name]
        argv = docker_argv(svc["command"])
        assert argv[0] == "tierpool", argv
        _check_tierpool(argv[1:])
        assert svc["environment"]["REDIS_URL"] == f"redis://redis:{redis_port}/0"
    assert services["gateway"]["command"] == ["gateway"]
    gateway = services["gateway"]
    port = gateway["environment"]["HTTP_PORT"]
    assert gateway["ports"] == [f"{port}:{port}"]
    assert f"{port}/api/v1/ready" in " ".join(gateway["healthcheck"]["test"])
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    assert worker["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"

    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"


def test_prometheus_scrapes_every_worker(compose: dict[str, Any]) -> None:
    prom = load_yaml((DEPLOY / "prometheus.yml").read_text())
    job, gateway = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and "worker" in compose["services"]
    assert str(sd["port"]) == compose["services"]["worker"]["environment"]["METRICS_PORT"]
    assert gateway["metrics_path"] == "/api/v1/metrics"
    (gsd,) = gateway["dns_sd_configs"]
    assert gsd["names"] == ["gateway"]
    assert str(gsd["port"]) == compose["services"]["gateway"]["environment"]["HTTP_PORT"]
    mount = compose["services"]["prometheus"]["volumes"][0]
    assert mount.startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml")


def test_procfile_commands_exist() -> None:
    processes: dict[str, list[str]] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        words = shlex.split(command)
        while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] == "exec"):
            words.pop(0)
        processes[name.strip()] = words
    assert set(processes) == {"redis", "worker", "podsim", "gateway"}
    assert processes["redis"][0] == "redis-server"
    for name in ("worker", "podsim", "gateway"):
        assert processes[name][0] == "tierpool"
        _check_tierpool(processes[name][1:])
    assert "METRICS_PORT=$PORT" in (ROOT / "Procfile").read_text()


def test_no_file_uses_the_default_redis_port() -> None:
    """Deploy files must never collide with a Redis already on 6379."""
    for path in (
        ROOT / "compose.yaml",
        ROOT / "Procfile",
        ROOT / "Dockerfile",
        DEPLOY / "prometheus.yml",
    ):
        assert "6379" not in path.read_text(), path


def test_dockerfile_installs_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"pip install (\.|'\.\[kubernetes\]')", text), "the image installs tierpool"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = [p.rstrip("*") for p in patterns]
    assert packages, "pyproject names no packages"
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.MULTILINE), package
    # Every subpackage linked into tierpool/ is copied too (tierpool/kube -> ../kube).
    for link in sorted((ROOT / "tierpool").iterdir()):
        if link.is_symlink():
            target = Path(os.readlink(link)).name
            assert re.search(rf"^COPY {target} {target}$", text, re.MULTILINE), target


# --- Grafana --------------------------------------------------------------------------------


def exported_names() -> dict[str, set[str]]:
    """Every sample name the workers export -> the labels it carries."""
    out: dict[str, set[str]] = {}
    families = [*metrics.REGISTRY.collect(), *gateway_metrics.REGISTRY.collect()]
    for family in families:
        labels = set(_labelnames(family.name))
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",),
        }[family.type]
        for suffix in suffixes:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _labelnames(family: str) -> tuple[str, ...]:
    for value in [*vars(metrics).values(), *vars(gateway_metrics).values()]:
        if getattr(value, "_name", None) == family:
            names: tuple[str, ...] = value._labelnames
            return names
    raise AssertionError(f"no metric object for {family}")


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode((DEPLOY / "grafana" / "dashboard.json").read_text())
    return doc


def test_every_dashboard_query_names_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    assert "tierpool_requests_total" in exported and "tierpool_pods" in exported
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        used = re.findall(r"\btierpool_[a-z0-9_]+", expr)
        assert used, f"query names no tierpool metric: {expr}"
        for name in used:
            assert name in exported, f"{name} is not exported (query: {expr})"
        # Grouping labels must exist on the metric grouped (``instance`` is Prometheus's).
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                carriers = [n for n in used if label in exported[n]]
                assert carriers or label == "instance", f"label {label!r} unknown in {expr}"


def test_dashboard_covers_the_issue(dashboard: dict[str, Any]) -> None:
    text = msgspec.json.encode(dashboard).decode()
    for metric in (
        "tierpool_pods",
        "tierpool_free_capacity",
        "tierpool_pool_target",
        "tierpool_request_duration_seconds_bucket",
        "tierpool_stream_lag",
        "tierpool_stream_pending",
        "tierpool_leader",
        "tierpool_active_calls",
        "tierpool_allocations_total",  # per pool (issue 15)
        "tierpool_releases_total",
        "tierpool_http_requests_total",
        "tierpool_http_request_duration_seconds_bucket",
    ):
        assert metric in text, metric
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_matches_the_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (source,) = load_yaml((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {
        t["datasource"]["uid"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])
    }
    assert uids == {source["uid"]}
    (provider,) = load_yaml((prov / "dashboards" / "tierpool.yml").read_text())["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    dash_mount = next(m for m in mounts if m.startswith("./deploy/grafana/dashboard.json:"))
    assert dash_mount.split(":")[1].startswith(provider["options"]["path"] + "/")
    assert any(
        m.startswith("./deploy/grafana/provisioning:/etc/grafana/provisioning") for m in mounts
    )
