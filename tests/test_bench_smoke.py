"""``tierpool bench`` runs end to end with tiny settings: a table and valid JSON come out.

Not a performance test: no figure is checked against a target, only that
every part ran and reported something.
"""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_prints_a_table_and_json() -> None:
    """Guards the command itself: every part runs, the table and the JSON agree on the parts."""
    cmd = [
        sys.executable,
        "-m",
        "tierpool",
        "bench",
        "--workers",
        "2",
        "--pods",
        "40",
        "--tiers",
        "mixed",
        "--duration",
        "0.5",
        "--repeat",
        "1",
        "--raw-procs",
        "1",
        "--batch",
        "8",
        "--concurrency",
        "4",
        "--rates",
        "50",
        "--changes",
        "2",
        "--requests",
        "200",
        "--json",
        "-",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    table, brace, rest = out.partition("\n{")
    assert "| measure | result | target | met |" in table
    for row in (
        "Raw ceiling",
        "End to end",
        "Latency, open loop 50/s",
        "Config propagation",
        "Memory after",
        "Failover",
    ):
        assert row in table, f"no {row!r} row in:\n{table}"
    results = msgspec.json.decode(brace.strip() + rest)
    assert set(results) >= {"meta", "raw", "e2e", "latency", "propagation", "memory", "failover"}
    assert results["raw"]["ceiling"] > 0
    assert results["e2e"]["max"] > 0
    assert results["propagation"]["changes"] == 2
    assert results["memory"]["requests"] >= 200
    assert results["failover"]["new_token"] != results["failover"]["old_token"]


@pytest.mark.slow
def test_bench_cluster_prints_both_figures() -> None:
    """``tierpool bench --cluster`` runs on its own three-master cluster and reports both parts."""
    cmd = [
        sys.executable,
        "-m",
        "tierpool",
        "bench",
        "--cluster",
        "--pods",
        "40",
        "--duration",
        "0.5",
        "--repeat",
        "1",
        "--batch",
        "8",
        "--concurrency",
        "4",
        "--json",
        "-",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    table, brace, rest = done.stdout.partition("\n{")
    assert "| part | 1 namespace | 3 namespaces (3 masters) | ratio |" in table
    result = msgspec.json.decode(brace + rest)
    assert len(set(result["namespaces"].values())) == 3  # three namespaces, three masters
    for part in ("raw", "e2e"):
        assert result[part]["one_namespace"] > 0 and result[part]["three_namespaces"] > 0
    assert all(run.get("errors", 0) == 0 for run in result["runs"])


def test_breakdown_reports_every_transition_and_its_commands() -> None:
    """``python -m tierpool.bench.breakdown``: each backlog fully processed, per-command counts."""
    cmd = [
        sys.executable,
        "-m",
        "tierpool.bench.breakdown",
        "--pods",
        "30",
        "--requests",
        "30",
        "--rounds",
        "1",
        "--profile",
        "5",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "allocate  n=30 {'allocated': 30} Redis CPU" in out
    assert "release   n=30 {'released': 30} Redis CPU" in out
    assert "evalsha" in out and "xpending" in out  # per-command lines
    assert "function calls" in out  # the worker's profile
