"""tierpool.kube's pieces one by one: selector, pod translation, config, fencing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightkube.core.selector import build_selector
from lightkube.resources.core_v1 import Pod
from redis.asyncio import Redis

from tests.kubeapi import FakeKube
from tests.statekit import KEYS, make_state
from tierpool.core.errors import LeadershipLost, SettingsError
from tierpool.core.podsource import FencedPods
from tierpool.core.settings import Settings
from tierpool.kube import KubePodSource, load_config
from tierpool.kube.pods import observe, register_message
from tierpool.kube.selector import parse_selector
from tierpool.schemas import PodDeregister

# --- selector -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ("app=voice-agent", "app=voice-agent"),
        ("app==voice-agent, track!=canary", "app=voice-agent,track!=canary"),
        ("tier in (gold, basic),!legacy,x.io/ok", "tier in (basic,gold),!legacy,x.io/ok"),
        ("env notin (dev)", "env notin (dev)"),
    ],
)  # fmt: skip
def test_selector_is_sent_as_written(text: str, sent: str) -> None:
    assert build_selector(parse_selector(text)) == sent


@pytest.mark.parametrize("text", ["a b", "=v", "x in ()", "x in (a,,b)", "app=a,app=b", ","])
def test_bad_selector_names_the_variable(text: str) -> None:
    with pytest.raises(SettingsError, match="POD_LABEL_SELECTOR"):
        parse_selector(text)


# --- one pod ----------------------------------------------------------------------------


def pod(**kw: Any) -> Pod:
    meta = {"name": kw.get("name", "va-1"), "namespace": "voice", "labels": kw.get("labels", {})}
    meta["annotations"] = kw.get("annotations", {})
    if kw.get("terminating"):
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": kw.get("phase", "Running"),
        "conditions": [{"type": "Ready", "status": kw.get("ready", "True")}],
    }
    if kw.get("ip", "10.1.2.3"):
        status["podIP"] = kw.get("ip", "10.1.2.3")
    return Pod.from_dict({"metadata": meta, "status": status})


def test_ready_means_running_ready_with_an_ip_and_not_terminating() -> None:
    s = Settings()
    assert observe(pod(), s).placeable
    assert not observe(pod(ready="False"), s).placeable
    assert not observe(pod(phase="Pending"), s).placeable
    assert not observe(pod(ip=None), s).placeable
    assert not observe(pod(terminating=True), s).placeable


def test_zone_capability_port_from_annotations_over_labels() -> None:
    s = Settings(pod_endpoint_template="ws://{ip}:{port}/agent/{name}", pod_port=7000)
    seen = observe(
        pod(
            labels={"tierpool.io/zone": "open", "tierpool.io/capability": "2"},
            annotations={"tierpool.io/zone": "restricted", "tierpool.io/port": "9000"},
        ),
        s,
    )
    assert seen.placement is not None
    assert (seen.placement.zone, seen.placement.capability) == ("restricted", 2)
    assert seen.placement.endpoint == "ws://10.1.2.3:9000/agent/va-1"
    assert observe(pod(ip="fd00::5"), Settings()).placement.endpoint == "http://[fd00::5]:8080"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "notes",
    [
        {"tierpool.io/zone": "restrictd"},
        {"tierpool.io/capability": "9"},
        {"tierpool.io/port": "http"},
    ],
)
def test_wrong_values_are_never_placed(notes: dict[str, str]) -> None:
    seen = observe(pod(annotations=notes), Settings())
    assert not seen.placeable
    assert seen.problem and next(iter(notes)) in seen.problem


def test_a_pod_name_outside_the_contract_is_not_placed() -> None:
    seen = observe(pod(name="x" * 200), Settings())
    assert not seen.placeable and seen.problem


def test_register_carries_the_source_labels() -> None:
    seen = observe(pod(), Settings())
    assert seen.placement is not None
    msg = register_message("va-1", seen.placement, ready=False, labels={"team": "a"})
    assert msg.labels == {
        "team": "a",
        "tierpool.io/source": "kubernetes",
        "tierpool.io/ready": "false",
    }


# --- configuration ----------------------------------------------------------------------


def test_kubeconfig_is_used_outside_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = FakeKube("voice")  # not started: only its URL is used
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "config")))
    cfg = load_config().get()
    assert cfg.cluster.server == kube.url
    assert cfg.namespace == "voice"
    kube.server.server_close()


def test_in_cluster_service_account_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path a worker Pod takes: the mounted token, CA and the API server's env."""
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("sa-token")
    (account / "namespace").write_text("voice")
    (account / "ca.crt").write_text("")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    cfg = load_config(service_account=account).get()
    assert cfg.cluster.server == "https://10.96.0.1:443"
    assert cfg.user.token == "sa-token"


def test_no_config_at_all_stops_the_worker_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="no Kubernetes config"):
        KubePodSource(Settings(pod_source="kubernetes"))


# --- fencing ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_deposed_leader_writes_nothing(r: Redis) -> None:
    """The source's writes carry the term's token: once the lease is another's,
    a register or deregister it sends changes nothing and ends its term."""
    state = await make_state(r, {"gold": {"target": 2}})
    await r.set(KEYS.leader, "old-holder:1")
    old = FencedPods(state, "old-holder:1")
    seen = observe(pod(), Settings())
    assert seen.placement is not None
    (outcome,) = await old.apply([register_message("va-1", seen.placement, ready=True)])
    assert outcome.status == "registered"
    assert (await old.read(["va-1"]))["va-1"].endpoint == "http://10.1.2.3:8080"

    await r.set(KEYS.leader, "new-holder:2")  # a takeover
    with pytest.raises(LeadershipLost):
        await old.apply([PodDeregister(pod_id="va-1")])
    assert await r.hexists(KEYS.pod_pool, "va-1"), "the deposed leader's deregister ran"
    await r.delete(KEYS.leader)  # lapsed, nobody holds it
    with pytest.raises(LeadershipLost):
        await old.apply([PodDeregister(pod_id="va-1")])
    assert await r.hexists(KEYS.pod_pool, "va-1")

    mine = await FencedPods(state, "old-holder:1").labelled("tierpool.io/source", "kubernetes")
    assert set(mine) == {"va-1"}


def test_core_never_imports_the_kubernetes_edge() -> None:
    from tests.conftest import ROOT

    for path in (ROOT / "core").rglob("*.py"):
        imports = [
            line
            for line in path.read_text().splitlines()
            if line.lstrip().startswith(("import ", "from "))
        ]
        assert not [line for line in imports if "kube" in line], path
