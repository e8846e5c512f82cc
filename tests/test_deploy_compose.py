"""deploy/compose.yaml: valid under the Compose Specification (its JSON schema, vendored), and
wired as docs/operations.md says: Redis with AOF on a volume, Prometheus scraping the server,
Grafana provisioned with the data source and the dashboards the repository ships."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import yaml

from tests.processes import REPO, debian_executable

DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SCHEMA = DEPLOY / "schemas" / "compose-spec.json"


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(COMPOSE), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_rejects_a_broken_compose_file() -> None:
    """The check can fail: a misspelt key and a wrong type are caught."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    broken = {"services": {"server": {"imgae": "x", "ports": "8000:8000"}}}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = COMPOSE["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    volume, target = redis["volumes"][0].split(":")
    assert target == data_dir and volume in COMPOSE["volumes"]
    server = COMPOSE["services"]["server"]
    assert server["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"


def test_server_gets_its_admin_key_pricing_and_spool_volume() -> None:
    server = COMPOSE["services"]["server"]
    (secret,) = server["secrets"]
    assert server["environment"]["SUBJECTIVE_ADMIN_KEY_FILE"] == f"/run/secrets/{secret}"
    assert COMPOSE["secrets"][secret]["file"].startswith("./secrets/")  # gitignored
    assert "/deploy/secrets/" in (REPO / ".gitignore").read_text().splitlines()
    (prices,) = server["configs"]
    assert (DEPLOY / COMPOSE["configs"][prices["source"]]["file"]).is_file()
    assert server["command"][server["command"].index("--pricing") + 1] == prices["target"]
    assert any(v.split(":")[1] == "/app/var" for v in server["volumes"])
    assert server["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").is_file()


def test_prometheus_scrapes_the_server(tmp_path: Path) -> None:
    prometheus = COMPOSE["services"]["prometheus"]
    (config,) = prometheus["configs"]
    text = COMPOSE["configs"][config["source"]]["content"]
    (job,) = yaml.safe_load(text)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    promtool = debian_executable("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_mounts_the_provisioning_and_dashboards() -> None:
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"] if v.startswith("."))
    for source in mounts:
        assert (DEPLOY / source).is_dir(), source
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "subjective.yaml").read_text()
    )["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (DEPLOY / "grafana" / "dashboards" / home.name).is_file()
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
