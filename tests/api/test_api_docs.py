"""docs/api.md and the dashboards against a running appliance: every example answer has the
fields and JSON types of the real one (and documents all of them), every exposed metric is in the
metric table, and every metric the Grafana dashboard queries is exposed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import TOKEN, RunningCell
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DOCS = Path(__file__).resolve().parents[2] / "docs"
API_MD = (DOCS / "api.md").read_text()
EXAMPLE = re.compile(
    r"<!-- example: (GET|POST) (\S+) (\d{3}) -->\s*```(json|text)\n(.*?)```", re.DOTALL
)
#: Maps keyed by names (channels, reasons, poll groups) and the poller's stats, whose keys
#: depend on the device: the examples show some of their keys, never others than the real ones.
OPEN_MAPS = {"values", "channels", "stats", "groups", "phase_ms", "rejected_by_reason"}


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCell]:
    with RunningCell(tmp_path_factory.mktemp("docs")) as rc:
        rc.wait_ready()
        rc.call(lambda: rc.cell.inject(1, "temp_ramp", 6.0))  # an active alert to show
        rc.wait_for(lambda: rc.get_json("/api/v1/alerts")["active"], 20, "the alert")
        yield rc


def kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(v)]


def same_shape(doc: Any, real: Any, where: str, open_map: bool = False) -> list[str]:
    """Differences between an example and the real answer (``null`` matches any type)."""
    if doc is None or real is None:
        return []
    if kind(doc) != kind(real):
        return [f"{where}: documented {kind(doc)}, real {kind(real)}"]
    out: list[str] = []
    if isinstance(doc, dict):
        for k in doc:
            if k not in real:
                out.append(f"{where}.{k}: documented but not in the real answer")
            else:
                out += same_shape(doc[k], real[k], f"{where}.{k}", k in OPEN_MAPS)
        if not open_map:
            out += [
                f"{where}.{k}: in the real answer, not documented" for k in real if k not in doc
            ]
    elif isinstance(doc, list) and doc and real:
        out += same_shape(doc[0], real[0], f"{where}[0]")
    return out


def examples() -> list[tuple[str, str, int, str, str]]:
    found = [(m[1], m[2], int(m[3]), m[4], m[5]) for m in EXAMPLE.finditer(API_MD)]
    assert len(found) >= 9
    return found


def real_answer(cell: RunningCell, method: str, path: str, status: int) -> tuple[int, bytes]:
    if method == "GET":
        got, _, body = cell.request(path)
        return got, body
    assert path == "/api/v1/alerts/ack"
    alert_id = cell.get_json("/api/v1/alerts")["active"][0]["alert_id"]
    headers = {"Authorization": f"Bearer {TOKEN}"} if status == 200 else {}
    got, _, body = cell.request(
        path, method="POST", body=json.dumps({"alert_id": alert_id}).encode(), headers=headers
    )
    return got, body


def test_every_endpoint_has_an_example_in_the_docs() -> None:
    documented = {(m, p.split("?")[0]) for m, p, *_ in examples()}
    for endpoint in (
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/devices"),
        ("GET", "/api/v1/devices/cnc-1"),
        ("GET", "/api/v1/alerts"),
        ("GET", "/api/v1/engine"),
        ("POST", "/api/v1/alerts/ack"),
    ):
        assert endpoint in documented, endpoint


def test_the_examples_in_docs_api_md_match_the_real_answers(cell: RunningCell) -> None:
    problems: list[str] = []
    for method, path, status, lang, text in examples():
        got, body = real_answer(cell, method, path, status)
        where = f"{method} {path}"
        if got != status:
            problems.append(f"{where}: documented {status}, real {got}")
            continue
        if lang == "json":
            problems += same_shape(json.loads(text), json.loads(body), where)
        else:
            real = {
                s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples
            }
            doc = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
            problems += [f"{where}: {n} documented, not exposed" for n in sorted(doc - real)]
    assert problems == [], "\n".join(problems)


def families(cell: RunningCell) -> dict[str, str]:
    """Exposed metric families (counters with ``_total``) and their types, samples or not."""
    _, _, body = cell.request("/metrics")
    return {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in text_string_to_metric_families(body.decode())
    }


def exposed(cell: RunningCell) -> set[str]:
    """Every series name a query can use (histograms: ``_bucket``, ``_count``, ``_sum``)."""
    out: set[str] = set()
    for name, type_ in families(cell).items():
        out |= {name + s for s in ("_bucket", "_count", "_sum")} if type_ == "histogram" else {name}
    return out


def test_every_exposed_metric_is_in_the_metric_table(cell: RunningCell) -> None:
    documented: set[str] = set()
    for line in API_MD.splitlines():
        if not line.startswith("| `appliance_"):
            continue
        names = re.findall(r"`(_?[a-z0-9_]+)`", line.split("|")[1])
        prefix = "_".join(names[0].split("_")[:2])
        documented |= {n if n.startswith("appliance_") else prefix + n for n in names}
    real = set(families(cell))
    assert sorted(real - documented) == []
    assert sorted(documented - real) == []


def test_every_metric_the_grafana_dashboard_queries_is_exposed(cell: RunningCell) -> None:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if "appliance_" in str(v["query"])]
    queried = {m for e in exprs for m in re.findall(r"\b(appliance_[a-z0-9_]+)", e)}
    assert len(queried) >= 15
    assert sorted(queried - exposed(cell)) == []


def test_the_prometheus_example_scrapes_the_metrics_path() -> None:
    text = (DOCS / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and "job_name: appliance" in text
