"""Operator commands against a live system: a worker subprocess, registered pods.

Commands run in process (``tierpool.workers.cli.main`` in a thread, output captured),
so each costs milliseconds; :func:`test_entry_point_exit_codes` runs the real
``tierpool`` entry point in subprocesses for the exit codes scripts rely on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import ROOT, wait_for
from tests.procs import WorkerPool
from tierpool.client.client import TierpoolClient
from tierpool.schemas import PodRegister
from tierpool.workers.cli import main as cli_main
from tierpool.workers.redisproc import free_port

pytestmark = pytest.mark.anyio

NS = "t"
PODS = ("pod-a", "pod-b", "pod-c")


@dataclass
class Live:
    url: str
    r: Redis
    client: TierpoolClient
    capsys: pytest.CaptureFixture[str]
    pool: WorkerPool

    async def tp(self, *argv: str, url: str | None = None) -> tuple[int, str, str]:
        """Run ``tierpool ARGV --redis-url URL --namespace t``: (exit code, stdout, stderr)."""
        self.capsys.readouterr()
        full = [*argv, "--redis-url", url or self.url, "--namespace", NS]
        code = await anyio.to_thread.run_sync(cli_main, full)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def tp_json(self, *argv: str, expect: int = 0) -> Any:
        code, out, err = await self.tp(*argv, "--json")
        assert code == expect, err
        return msgspec.json.decode(out)


@pytest.fixture
async def live(
    r: Redis,
    redis_url: str,
    tmp_path: Path,
    env_clean: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Live]:
    env_clean.setenv("POD_TTL", "60s")  # the CLI classifies pods with the workers' POD_TTL
    with WorkerPool(redis_url, tmp_path, env={"POD_TTL": "60s"}) as pool:
        await pool.start(r, 1)
        async with TierpoolClient.from_url(redis_url, namespace=NS) as client:
            for i, pod in enumerate(PODS):
                reply = await client.send_pod_event(
                    PodRegister(pod_id=pod, endpoint=f"http://10.1.0.{i}:8080")
                )
                assert reply is not None and reply.status == "registered"
            yield Live(redis_url, r, client, capsys, pool)


async def _status_pods(live: Live, n: int) -> bool:
    doc = await live.tp_json("status")
    return bool(sum(p["pods"] for p in doc["pools"]) == n)


async def test_status(live: Live) -> None:
    await wait_for(lambda: _status_pods(live, 3), timeout_s=20)
    doc = await live.tp_json("status")
    assert doc["namespace"] == NS
    assert doc["config_version"] == 1
    assert doc["leader"] == live.pool.procs[0].worker_id
    assert doc["workers_alive"] == 1
    assert [p["pool"] for p in doc["pools"]] == ["gold", "standard", "overflow"]
    gold = doc["pools"][0]
    assert gold["type"] == "exclusive" and gold["target"] == 10
    assert sum(p["free"] for p in doc["pools"]) == 3
    assert sum(p["free_capacity"] for p in doc["pools"]) == 3
    streams = {s["stream"]: s for s in doc["streams"]}
    assert streams["allocate"]["consumed"] and not streams["events"]["consumed"]
    assert streams["pods"]["lag"] == 0 and streams["pods"]["pending"] == 0

    code, out, _ = await live.tp("status")
    assert code == 0
    assert f"leader {doc['leader']} (term" in out
    assert "config v1" in out and "workers alive 1/1" in out
    assert "FREE CAP" in out and "gold" in out and "LAG" in out


async def test_requests_and_pods(live: Live) -> None:
    code, out, err = await live.tp("allocate", "call-1")
    assert code == 0, err
    assert out.startswith("allocated: pod ")
    (placed,) = [p for p in PODS if p in out]

    code, out, _ = await live.tp("allocate", "call-1")
    assert code == 0 and "already held by this call" in out and placed in out

    pods = {p["pod_id"]: p for p in await live.tp_json("pods")}
    assert pods[placed]["state"] == "full" and pods[placed]["calls"] == ["call-1"]
    assert all(pods[p]["state"] == "free" for p in PODS if p != placed)
    full = await live.tp_json("pods", "--state", "full")
    assert [p["pod_id"] for p in full] == [placed]
    code, out, _ = await live.tp("pods", "--calls")
    assert code == 0 and "call-1" in out and "full 1" in out and "total 3" in out

    code, out, _ = await live.tp("release", "call-1")
    assert code == 0 and out.startswith("released") and placed in out
    code, out, _ = await live.tp("release", "call-1")
    assert code == 1 and out.startswith("not_found")

    other = next(p for p in PODS if p != placed)
    code, out, _ = await live.tp("drain", other, "--reason", "deploy")
    assert code == 0 and out.startswith("drained")
    states = {p["pod_id"]: p["state"] for p in await live.tp_json("pods")}
    assert states[other] == "draining"
    code, _, _ = await live.tp("undrain", other)
    assert code == 0
    states = {p["pod_id"]: p["state"] for p in await live.tp_json("pods")}
    assert states[other] == "free"
    code, out, _ = await live.tp("drain", "no-such-pod")
    assert code == 1 and out.startswith("not_found")


async def test_allocate_rejected_explains(live: Live) -> None:
    code, out, _ = await live.tp("allocate", "c-r", "--zone", "restricted")
    assert code == 1
    assert out.startswith("rejected:")
    assert "  - " in out  # each filter's reason on its own line
    doc = await live.tp_json("allocate", "c-r2", "--zone", "restricted", expect=1)
    assert doc["status"] == "rejected" and doc["reasons"]


async def test_config_get_set_validate(live: Live, tmp_path: Path) -> None:
    doc = await live.tp_json("config", "get")
    assert doc["version"] == 1 and set(doc["tiers"]) == {"gold", "standard", "overflow"}
    code, out, _ = await live.tp("config", "get")
    assert code == 0 and "tier config version 1" in out and "default chain: gold" in out

    good = tmp_path / "good.json"
    good.write_text('{"gold": 2, "silver": {"type": "shared", "target": 1, "max_concurrent": 3}}')
    bad = tmp_path / "bad.json"
    bad.write_text('{"gold": {"type": "golden", "target": -1}, "x y": 1}')
    code = await anyio.to_thread.run_sync(cli_main, ["config", "validate", str(good)])
    out, _ = live.capsys.readouterr()
    assert code == 0 and "valid, 2 tiers" in out and "silver" in out
    code = await anyio.to_thread.run_sync(cli_main, ["config", "validate", str(bad)])
    out, err = live.capsys.readouterr()
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(problems) >= 3, out  # every problem, not just the first
    assert "golden" in out and "target" in out and "'x y'" in out
    code = await anyio.to_thread.run_sync(cli_main, ["config", "validate", str(tmp_path / "no")])
    assert code == 1 and "cannot read" in live.capsys.readouterr().out

    code, out, err = await live.tp("config", "set", str(good), "--expected-version", "1")
    assert code == 0, err
    assert out.strip() == "applied: config version 2"
    code, _, err = await live.tp("config", "set", str(good), "--expected-version", "1")
    assert code == 1 and "conflict" in err
    code, _, err = await live.tp("config", "set", str(bad))
    assert code == 1 and "not sent" in err and "golden" in err
    assert (await live.tp_json("config", "get"))["version"] == 2

    async def status_sees_v2() -> bool:
        return bool((await live.tp_json("status"))["config_version"] == 2)

    await wait_for(status_sees_v2)


async def test_merchant_policies(live: Live) -> None:
    code, out, _ = await live.tp("merchant", "get")
    assert code == 0 and "no merchant policies" in out
    code, out, err = await live.tp(
        "merchant",
        "set",
        "m1",
        "--fallback",
        "gold,standard",
        "--zone",
        "any",
        "--min-capability",
        "1",
    )
    assert code == 0, err
    # A policy change does not change the tier config's version: the reply says
    # which counter moved (issue 14.10).
    assert out.startswith("applied: merchant policies version "), out
    assert await live.tp_json("merchant", "get", "m1") == {
        "m1": {"fallback": ["gold", "standard"], "zone": "any", "min_capability": 1}
    }
    code, out, _ = await live.tp("merchant", "get")
    assert "m1" in out and "gold,standard" in out
    # Every problem at once, before anything is sent (issue 14.10).
    code, _, err = await live.tp(
        "merchant", "set", "m2", "--pool", "nope", "--fallback", "gold,bad name,gold,zzz"
    )
    assert code == 1 and "not sent, 4 problem(s)" in err, err
    assert "gold listed more than once" in err and "'bad name' is not a pool name" in err
    assert "pool: tier 'nope' is not configured" in err
    assert "fallback: tier 'zzz' is not configured" in err

    # '' is "the dedicated pool only", shown apart from "no fallback" (issue 14.7).
    code, _, err = await live.tp("merchant", "set", "m3", "--pool", "gold", "--fallback", "")
    assert code == 0, err
    assert await live.tp_json("merchant", "get", "m3") == {"m3": {"pool": "gold", "fallback": []}}
    code, out, _ = await live.tp("merchant", "get")
    assert "(none: dedicated pool only)" in out and "(request's chain or default chain)" not in out
    code, _, err = await live.tp("merchant", "set", "m3", "--pool", "gold")
    assert code == 0, err
    code, out, _ = await live.tp("merchant", "get")
    assert "(request's chain or default chain)" in out
    code, _, _ = await live.tp("merchant", "remove", "m3")
    assert code == 0
    code, _, _ = await live.tp("merchant", "remove", "m1")
    assert code == 0
    code, _, err = await live.tp("merchant", "get", "m1")
    assert code == 1 and "no policy" in err


async def test_exit_codes_in_process(live: Live) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = await live.tp("status", url=down)
    assert code == 3 and "cannot reach Redis" in err
    code, _, err = await live.tp("allocate", "has space")
    assert code == 2 and "not sent" in err
    # Nobody consumes namespace "idle": the request waits for its reply in vain.
    code = await anyio.to_thread.run_sync(
        cli_main,
        ["allocate", "c1", "--redis-url", live.url, "--namespace", "idle", "--timeout", "0.3"],
    )
    assert code == 4 and "timed out" in live.capsys.readouterr().err
    code = await anyio.to_thread.run_sync(
        cli_main, ["status", "--redis-url", live.url, "--namespace", "bad{ns}"]
    )
    err = live.capsys.readouterr().err
    assert code == 2 and "--namespace 'bad{ns}'" in err and "TIERPOOL_NAMESPACE" not in err


async def test_cli_options_issue_14_10(live: Live) -> None:
    """Regression (issue 14.10): global options before the subcommand were
    refused; ``--timeout 0`` was accepted; a timeout did not say the request
    may still apply, and printed nothing with ``--json``."""
    live.capsys.readouterr()
    code = await anyio.to_thread.run_sync(
        cli_main, ["--redis-url", live.url, "--namespace", NS, "--json", "status"]
    )
    out, err = live.capsys.readouterr()
    assert code == 0, err
    assert msgspec.json.decode(out)["namespace"] == NS
    code = await anyio.to_thread.run_sync(
        cli_main, ["-n", NS, f"--redis-url={live.url}", "pods", "--json"]
    )
    out, err = live.capsys.readouterr()
    assert code == 0, err
    assert {p["pod_id"] for p in msgspec.json.decode(out)} == set(PODS)

    for bad in ("0", "-1", "nan"):
        code, _, err = await live.tp("allocate", "c9", "--timeout", bad)
        assert code == 2 and "--timeout" in err, (bad, err)

    live.capsys.readouterr()
    code = await anyio.to_thread.run_sync(
        cli_main,
        ["allocate", "c1", "--redis-url", live.url, "-n", "idle", "--timeout", "0.3", "--json"],
    )
    out, err = live.capsys.readouterr()
    assert code == 4
    doc = msgspec.json.decode(out)
    assert doc["status"] == "timeout" and doc["request_id"]
    assert "may still be applied" in doc["note"] and "may still be applied" in err


async def test_config_set_refuses_empty_and_warns_on_dropped_policy_pool(
    live: Live, tmp_path: Path
) -> None:
    """Regression (issue 14.8): ``config set '{}'`` replaced the live config with
    the built-in default and ``config validate`` called an empty file valid."""
    before = await live.tp_json("config", "get")
    for text in ("{}", "", "  \n"):
        path = tmp_path / "empty.json"
        path.write_text(text)
        code, _, err = await live.tp("config", "set", str(path))
        assert code == 1 and "the config is empty" in err, err
        code = await anyio.to_thread.run_sync(cli_main, ["config", "validate", str(path)])
        assert code == 1 and "the config is empty" in live.capsys.readouterr().out
    # Sent straight to the stream, a worker refuses it too.
    reply = await live.client.change_config("{}")
    assert reply.status == "invalid" and "the config is empty" in (reply.error or "")
    assert await live.tp_json("config", "get") == before

    code, _, err = await live.tp("merchant", "set", "m1", "--pool", "gold", "--fallback", "")
    assert code == 0, err
    path = tmp_path / "nogold.json"
    path.write_text(msgspec.json.encode({"tiers": {"standard": {"type": "exclusive"}}}).decode())
    _code, _out, err = await live.tp("config", "set", str(path))
    assert "warning: merchant 'm1'" in err and "gold" in err, err


@pytest.mark.slow
def test_entry_point_exit_codes(tmp_path: Path) -> None:
    """The installed ``tierpool`` entry point: usage 2, Redis unreachable 3, ok 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TIERPOOL_NAMESPACE")}
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"

    def tierpool(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tierpool", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert tierpool().returncode == 2
    assert tierpool("status", "--bogus").returncode == 2
    done = tierpool("status")
    assert done.returncode == 3 and "cannot reach Redis" in done.stderr
    good = tmp_path / "c.json"
    good.write_text('{"gold": 1}')
    done = tierpool("config", "validate", str(good), "--json")
    assert done.returncode == 0 and msgspec.json.decode(done.stdout)["valid"] is True


async def test_a_reply_not_its_own_is_one_line_not_a_traceback(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply the client refuses (ReplyMismatch: a forged one here) ends the
    command with one line and exit 1, like any refusal."""
    from tierpool.client import client as client_module
    from tierpool.core.keys import Keys

    monkeypatch.setattr(client_module, "new_request_id", lambda: "forged-1")
    await live.r.xadd(
        Keys(NS).reply("forged-1"),
        {"request_id": "forged-1", "status": "allocated", "kind": "allocate", "call_id": "other"},
    )
    code, _, err = await live.tp("allocate", "c-mine")
    assert code == 1, err
    assert "the reply cannot be trusted" in err and "Traceback" not in err
