"""deploy/prometheus/: the recording rules that give smart-router's metric names.

``promtool`` (Debian package ``prometheus``) checks and unit-tests them. On a
developer machine without it these tests skip; under ``CI=true`` (``.ci/run``
sets it, and installs promtool) a missing promtool is a failure, so CI can
never pass without having run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_deploy import exported_names, load_yaml

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "smart-router.rules.yml"
UNIT_TESTS = RULES_DIR / "smart-router.test.yml"

ANCHOR_METRICS = (
    "smart_router_allocations_total",
    "smart_router_releases_total",
    "smart_router_active_calls",
    "smart_router_pool_available_pods",
    "smart_router_pool_assigned_pods",
    "smart_router_leader_status",
    "smart_router_panics_recovered_total",
    "smart_router_drains_total",
    "smart_router_zombies_recovered_total",
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "http_request_duration_seconds_sum",
    "http_request_duration_seconds_count",
)
"""The anchor's 11 metrics (digest §12), the histogram as its three series."""


def promtool() -> str:
    """The promtool binary; skip without it, unless under CI, where that fails."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is missing under CI: .ci/run must install `prometheus`")
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return path


def run_promtool(*args: str, cwd: Path = RULES_DIR) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_rules_check() -> None:
    out = run_promtool("check", "rules", RULES.name)
    assert f"SUCCESS: {len(ANCHOR_METRICS)} rules found" in out


def test_rules_unit_tests_pass() -> None:
    """Values per anchor metric, computed by Prometheus's own engine from given inputs."""
    run_promtool("test", "rules", UNIT_TESTS.name)


def test_every_anchor_metric_is_recorded_from_exported_metrics() -> None:
    doc = load_yaml(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert sorted(r["record"] for r in rules) == sorted(ANCHOR_METRICS)
    exported = exported_names()  # workers' and gateway's
    for rule in rules:
        used = re.findall(r"\btierpool_[a-z0-9_]+", rule["expr"])
        assert used, rule
        for name in used:
            assert name in exported, f"{rule['record']} reads {name}, which no worker exports"
    unit = UNIT_TESTS.read_text()
    for name in ANCHOR_METRICS:
        assert f"expr: {name}\n" in unit, f"{name} has no promtool unit test"


def test_compose_prometheus_loads_the_rules() -> None:
    prom = load_yaml((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.rules.yml"]
    compose = load_yaml((ROOT / "compose.yaml").read_text())
    assert (
        "./deploy/prometheus:/etc/prometheus/rules:ro"
        in (compose["services"]["prometheus"]["volumes"])
    )


def test_ci_installs_promtool() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "command -v promtool" in script and "need+=(prometheus)" in script
    assert "export CI=true" in script
