"""deploy/kubernetes/ parses, agrees with the code, and grants only pods get/list/watch."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_deploy import _check_tierpool, docker_argv
from tierpool.core.anchorenv import unused_variable_warnings
from tierpool.core.settings import Settings, env_variables

DIR = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    """Every manifest, by kind (one object of each kind)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] == "Kustomization":
                listed = {str(p) for p in doc["resources"]}
                assert listed == {p.name for p in DIR.glob("*.yaml")} - {path.name}
                continue
            assert doc["metadata"]["name"], path
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    assert set(out) == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    }
    return out


def test_the_role_grants_exactly_pods_get_list_watch(docs: dict[str, dict[str, Any]]) -> None:
    role = docs["Role"]
    assert role["apiVersion"] == "rbac.authorization.k8s.io/v1"
    rules = role["rules"]
    assert len(rules) == 1
    (rule,) = rules
    assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames or extras"
    assert rule["apiGroups"] == [""]
    assert rule["resources"] == ["pods"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    assert "*" not in (DIR / "role.yaml").read_text(), "no wildcard anywhere in the Role"
    # Nothing anywhere reaches wider: no ClusterRole, no cluster-wide binding.
    for path in DIR.glob("*.yaml"):
        assert "ClusterRole" not in path.read_text(), path


def test_binding_and_deployment_use_the_role_and_account(docs: dict[str, dict[str, Any]]) -> None:
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_the_configmap_carries_valid_anchor_variables(docs: dict[str, dict[str, Any]]) -> None:
    data: dict[str, str] = docs["ConfigMap"]["data"]
    known = set(env_variables()) | {"REDIS_URL"}
    assert set(data) <= known, f"unknown variables: {set(data) - known}"
    for anchor in ("REDIS_URL", "TIER_CONFIG", "LEASE_TTL", "DRAINING_TTL", "CLEANUP_INTERVAL",
                   "RECONCILE_INTERVAL", "METRICS_PORT", "LOG_LEVEL", "VOICE_AGENT_BASE_URL",
                   "NAMESPACE", "POD_LABEL_SELECTOR"):  # fmt: skip
        assert anchor in data, anchor
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    s = Settings.from_env(data)
    assert (s.pod_source, s.kube_namespace, s.pod_label_selector) == (
        "kubernetes",
        "default",
        "app=voice-agent",
    )
    assert unused_variable_warnings("worker", data) == [], "a variable the worker ignores"
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    refs = [e.get("configMapRef", {}).get("name") for e in container["envFrom"]]
    assert docs["ConfigMap"]["metadata"]["name"] in refs


def test_deployment_runs_a_worker_with_its_probes_and_the_service_finds_it(
    docs: dict[str, dict[str, Any]],
) -> None:
    dep = docs["Deployment"]
    template = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    argv = docker_argv(container["args"])
    assert argv[0] == "tierpool"
    _check_tierpool(argv[1:])
    assert argv[1] == "worker"
    port = int(docs["ConfigMap"]["data"]["METRICS_PORT"])
    (cport,) = container["ports"]
    assert cport["containerPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == port and sport["targetPort"] == cport["name"]
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert isinstance(template["spec"]["securityContext"]["runAsUser"], int)
