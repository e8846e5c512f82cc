"""Grafana dashboards in deploy/: well-formed for Grafana, and every query answers on a real
Prometheus scraping a real /metrics endpoint.

Two endpoints: a small HTTP server exposing a `ServerMetrics` fed with observations plus the
vLLM series the dashboards read, declared as vLLM declares them (fast, always run); and
`subjective serve` on the real model with vLLM's own metrics (marked vllm). To check any other
server: `prometheus = start_prometheus(f"{base_url}/metrics")`, send it traffic,
`prometheus.wait_for_scrapes(2)`, send more, wait again, then
`assert_dashboards_answer(prometheus)`.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge

from subjective.server.metrics import LEDGER_OUTCOMES, REQUEST_STATUSES, ServerMetrics
from tests.conftest import SERVED_NAME
from tests.prometheus_server import PrometheusServer, start_prometheus  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "prometheus"
# Grafana's own variables, as one window that holds every sample of a short run.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "5m", "$__range": "1h"}
LABEL_VALUES = re.compile(r"label_values\((.+), *(\w+)\)")  # a query variable's query


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def promql(expr: str, dashboard: dict) -> str:
    """`expr` as Grafana sends it with every template variable at "All"."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    variables = [v for v in dashboard["templating"]["list"] if v["type"] in ("query", "custom")]
    for variable in sorted(variables, key=lambda v: -len(v["name"])):
        name = re.escape(variable["name"])
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", variable["allValue"], expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def assert_dashboards_answer(prometheus: PrometheusServer, exempt: tuple[str, ...] = ()) -> None:
    """Every query of every dashboard is valid PromQL and answers with at least one number,
    every template variable has values; queries reading a metric in `exempt` need only be valid."""
    silent = []
    for path in DASHBOARDS:
        dashboard = load(path)
        for title, expr in queries(dashboard):
            values = [float(r["value"][1]) for r in prometheus.query(promql(expr, dashboard))]
            if not any(math.isfinite(v) for v in values) and not any(m in expr for m in exempt):
                silent.append(f"{path.name} / {title}: {expr} -> {values}")
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                match, label = LABEL_VALUES.fullmatch(variable["query"]["query"]).groups()
                if not prometheus.label_values(label, match):
                    silent.append(f"{path.name} / variable {variable['name']}: no values")
    assert not silent, "dashboard queries without an answer:\n" + "\n".join(silent)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed_for_grafana(path: Path) -> None:
    dashboard = load(path)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    for variable in variables.values():
        if variable["type"] == "query":
            assert LABEL_VALUES.fullmatch(variable["query"]["query"]), variable["name"]
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy") and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
    assert queries(dashboard)


def test_provisioning_matches_the_dashboards() -> None:
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert DASHBOARDS and len(uids) == len(set(uids))
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["uid"] == DATASOURCE_UID
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "subjective.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and provider["options"]["path"]
    check = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


class VllmLike:
    """The vLLM series the dashboards read, as vLLM 0.32's PrometheusStatLogger declares them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model_name", "engine")
        self.running = Gauge("vllm:num_requests_running", "", labels, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "", labels, registry=registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "", labels, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "", labels, registry=registry)

    def feed(self) -> None:
        engine = {"model_name": SERVED_NAME, "engine": "0"}
        self.running.labels(**engine).set(2)
        self.waiting.labels(**engine).set(1)
        self.kv_usage.labels(**engine).set(0.25)
        self.prompt_tokens.labels(**engine).inc(40)
        self.generation_tokens.labels(**engine).inc(16)


def feed(metrics: ServerMetrics) -> None:
    """A few requests of every quality and status, rejections, ledger writes, gauges."""
    for quality in ("aggressive", "conservative"):
        for status in REQUEST_STATUSES:
            metrics.observe_request(
                model=SERVED_NAME,
                quality=quality,
                status=status,
                prompt_tokens=20,
                completion_tokens=8,
                flops=3_000_000,
                dense_flops=9_000_000,
                kv_entries=400,
                kv_entries_dense=840,
                token_layers=840,
                token_layers_skipped=500,
                ttft_s=0.08,
                tpot_s=0.02,
                e2e_s=0.3,
            )
    metrics.observe_rejected(model=SERVED_NAME, status_code=429, error_type="rate_limit_exceeded")
    for outcome in LEDGER_OUTCOMES:
        metrics.observe_ledger_write(seconds=0.004, outcome=outcome)
    metrics.set_spool_depth(1)
    metrics.set_threshold(SERVED_NAME, 0.5)


@contextmanager
def metrics_endpoint(registry: CollectorRegistry) -> Iterator[str]:
    """A real HTTP /metrics serving `ServerMetrics(registry).render()`; yields its URL."""
    metrics = ServerMetrics(registry)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_every_dashboard_query_answers_on_a_real_prometheus(start_prometheus) -> None:  # noqa: F811
    registry = CollectorRegistry()
    metrics, engine = ServerMetrics(registry), VllmLike(registry)
    with metrics_endpoint(registry) as url:
        prometheus = start_prometheus(url)
        for _ in range(2):  # rate() needs two scraped samples that differ
            feed(metrics)
            engine.feed()
            prometheus.wait_for_scrapes(2)
        assert_dashboards_answer(prometheus)


@pytest.mark.vllm
def test_every_dashboard_query_answers_on_the_real_server(
    server: str,
    openai_client: openai.OpenAI,
    user_secret: str,
    start_prometheus,  # noqa: F811
) -> None:
    prometheus = start_prometheus(f"{server}/metrics", bearer=user_secret)
    for _ in range(2):  # rate() needs two scraped samples that differ
        for quality in ("aggressive", "conservative"):
            stream = openai_client.completions.create(  # TTFT and TPOT come from streams
                model=SERVED_NAME,
                prompt="1, 2, 3,",
                max_tokens=4,
                stream=True,
                extra_body={"quality": quality},
            )
            assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        with pytest.raises(openai.NotFoundError):
            openai_client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
        prometheus.wait_for_scrapes(2)
    # The test server's model is dense: no gated layers decided, no surprise threshold; and
    # none of these requests failed or was cancelled once running.
    assert_dashboards_answer(
        prometheus,
        exempt=("subjective_token_layers", "subjective_threshold", 'status=~"error|cancelled"'),
    )
