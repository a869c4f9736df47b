"""Prometheus metrics built at scrape time from the stages' own counters.

No second set of counters: :class:`ApplianceCollector` reads ``Appliance.stats()`` (which reads
every stage's ``stats()``), the uplink's ``rejected_by_reason()`` and the API's own request
counters when Prometheus scrapes ``/metrics``, and turns them into ``prometheus_client.core``
metric families. Every metric name is listed in docs/api.md; the Grafana dashboard in
docs/grafana-dashboard.json queries only these (tests/api checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from appliance.api.views import Source, readiness

DEVICE_STATES = ("connecting", "online", "degraded", "offline")

#: (metric suffix, key in DevicePoller.stats(), help) of the per-device counters.
_DEVICE_COUNTERS = (
    ("polls", "polls", "Polls of the device (every poll group)."),
    ("errors", "errors", "Transport failures (connects and polls)."),
    ("reconnects", "reconnects", "Reconnect attempts."),
    ("exception_responses", "exception_responses", "Requests the device refused or garbled."),
    ("overruns", "overruns", "Poll deadlines skipped because a poll ran late."),
    ("stale_values", "stale_values", "Values sent with quality STALE."),
    ("bad_values", "bad_values", "Values sent with quality BAD."),
)
_OUTBOX_COUNTERS = (
    ("appended", "Records written to the outbox."),
    ("published", "Records settled as accepted by the broker."),
    ("rejected", "Records settled as rejected."),
    ("evicted", "Records evicted by the disk budget (every class)."),
    ("evicted_alerts", "Alert records evicted by the disk budget."),
    ("coarsened", "Telemetry records merged into coarser ones by the disk budget."),
    ("disk_full", "Appends that hit a full disk."),
    ("disk_full_failed", "Appends that still failed after eviction and one retry."),
    ("recovered_corrupt", "Unusable outbox files moved aside and replaced."),
    ("append_failures", "Envelopes lost because the outbox could not store them."),
    ("delivered_kept", "Delivered telemetry records kept for backfill."),
    ("delivered_pruned", "Kept delivered records deleted by age (outbox.keep_delivered_s)."),
    ("delivered_evicted", "Kept delivered records deleted by the disk budget."),
    ("backfill_queued", "Delivered records queued again by backfill commands."),
)
_UPLINK_COUNTERS = (
    ("published", "Records published and acknowledged (accepted or rejected)."),
    ("connects", "Connections established."),
    ("disconnects", "Connections lost."),
    ("connect_failures", "Failed connection attempts."),
    ("auth_failures", "Connection attempts refused for credentials."),
    ("tls_failures", "Connection attempts failed in TLS."),
    ("short_connections", "Connections dropped within 10 s of being established."),
    ("quota_retries", "PUBACKs with quota exceeded (0x97): the record is retried."),
    ("historical", "Records published with historical: true (backlog)."),
    ("backfilled", "Records re-published for backfill commands."),
)


def _add_histogram(
    fam: HistogramMetricFamily,
    values: Sequence[str],
    bounds_ms: Sequence[float],
    counts: Sequence[int],
    sum_ms: float,
) -> None:
    """Add one histogram in seconds from per-bucket (non-cumulative) counts in ms."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds_ms, counts, strict=False):
        total += n
        buckets.append((repr(bound / 1000.0), total))
    total += counts[-1]
    buckets.append(("+Inf", total))
    fam.add_metric(list(values), buckets, sum_value=sum_ms / 1000.0)


class ApplianceCollector(Collector):
    """Collects the appliance's metrics at scrape time (called on the event loop)."""

    def __init__(
        self, app: Source, api_counters: Callable[[], tuple[dict[int, int], dict[str, int]]]
    ) -> None:
        self._app = app
        self._api_counters = api_counters

    def collect(self) -> Iterator[Metric]:
        app = self._app
        stats: dict[str, Any] = app.stats()
        aid = app.cfg.appliance.id
        info = GaugeMetricFamily(
            "appliance_info",
            "The appliance's identity (value 1).",
            labels=["appliance", "version", "model", "model_version", "backend"],
        )
        if app.bundle is not None and app.engine is not None:
            model = [app.bundle.name, app.bundle.version, app.engine.backend]
        else:
            model = ["", "", "none"]  # no model configured: nothing is scored
        info.add_metric([aid, stats["version"], *model], 1)
        yield info
        yield GaugeMetricFamily(
            "appliance_uptime_seconds", "Seconds since the appliance started.", stats["uptime_s"]
        )
        yield GaugeMetricFamily(
            "appliance_ready", "1 when /ready answers 200.", 0 if readiness(app) else 1
        )
        yield from self._devices(stats["acquisition"])
        yield from self._pipeline(stats)
        if stats["engine"] is not None:
            yield from self._engine(stats)
        yield from self._alerts(stats)
        yield from self._outbox(stats["outbox"])
        yield from self._uplink(stats["uplink"])
        yield from self._downlink(stats.get("downlink", {}))
        yield from self._releases(stats["models"])
        yield from self._api()

    def _devices(self, devices: list[dict[str, Any]]) -> Iterator[Metric]:
        for suffix, key, doc in _DEVICE_COUNTERS:
            fam = CounterMetricFamily(f"appliance_device_{suffix}", doc, labels=["device"])
            for d in devices:
                fam.add_metric([d["device"]], d[key])
            yield fam
        up = GaugeMetricFamily(
            "appliance_device_up", "1 when the device answers every poll group.", labels=["device"]
        )
        state = GaugeMetricFamily(
            "appliance_device_state",
            "The device's link state (1 for the current state).",
            labels=["device", "state"],
        )
        last = GaugeMetricFamily(
            "appliance_device_last_poll_timestamp_seconds",
            "Epoch seconds of the device's last poll.",
            labels=["device"],
        )
        jitter_p99 = GaugeMetricFamily(
            "appliance_device_poll_jitter_p99_seconds",
            "99th percentile of poll start lateness over the last 1000 polls.",
            labels=["device"],
        )
        for d in devices:
            name = d["device"]
            up.add_metric([name], 1 if d["state"] == "online" else 0)
            for s in DEVICE_STATES:
                state.add_metric([name, s], 1 if d["state"] == s else 0)
            last.add_metric([name], d["last_poll_ts"])
            jitter_p99.add_metric([name], d["jitter_ms_p99"] / 1000.0)
        jitter = HistogramMetricFamily(
            "appliance_device_poll_jitter_seconds",
            "How late each poll started against its deadline.",
            labels=["device"],
        )
        for d in devices:
            h = d["jitter_ms_histogram"]
            _add_histogram(jitter, [d["device"]], h["le"], h["counts"], h["sum"])
        yield from (up, state, last, jitter_p99, jitter)

    def _pipeline(self, stats: dict[str, Any]) -> Iterator[Metric]:
        for key, doc in (
            ("frames", "Frames acquired (one per poll of one device)."),
            ("windows_closed", "Feature windows closed (all machines)."),
            ("feature_rows", "Feature rows handed to the batcher."),
            ("incomplete_windows", "Windows not scored: a model channel had no good sample."),
            ("telemetry_messages", "Telemetry messages written to the outbox."),
        ):
            yield CounterMetricFamily(f"appliance_{key}", doc, stats[key])
        b = stats["batcher"]
        if b is None:  # no model
            return
        for key, doc in (
            ("submitted", "Rows submitted to the batcher."),
            ("dropped", "Rows dropped because the batcher queue was full (oldest first)."),
            ("batches", "Batches sent to the engine."),
            ("rows_scored", "Rows scored."),
            ("errors", "Batches whose inference raised."),
        ):
            yield CounterMetricFamily(f"appliance_batcher_{key}", doc, b[key])
        yield GaugeMetricFamily(
            "appliance_batcher_queued", "Rows waiting in the queue.", b["queued"]
        )

    def _engine(self, stats: dict[str, Any]) -> Iterator[Metric]:
        labels = ["backend", "model"]
        bundle = self._app.bundle
        model = bundle.name if bundle is not None else ""
        latency = HistogramMetricFamily(
            "appliance_inference_latency_seconds",
            "Duration of one engine.infer() call (one batch), per backend of the chain.",
            labels=labels,
        )
        rows = CounterMetricFamily("appliance_inference_rows", "Rows scored.", labels=labels)
        errors = CounterMetricFamily(
            "appliance_inference_errors", "infer() calls that raised.", labels=labels
        )
        for b in stats["engine"]["backends"]:
            values = [b["backend"], model]
            h = b["latency_ms_histogram"]
            _add_histogram(latency, values, h["le"], h["counts"], b["total_ms"])
            rows.add_metric(values, b["rows"])
            errors.add_metric(values, b["errors"])
        yield from (latency, rows, errors)

    def _alerts(self, stats: dict[str, Any]) -> Iterator[Metric]:
        a = stats["alerts"]
        yield CounterMetricFamily("appliance_alerts_raised", "Alerts raised.", a["raised"])
        yield CounterMetricFamily("appliance_alerts_cleared", "Alerts cleared.", a["cleared"])
        active = GaugeMetricFamily(
            "appliance_alerts_active", "Alerts raised and not cleared.", labels=["rule", "machine"]
        )
        for x in a["active"]:
            active.add_metric([str(x["rule"]), str(x["machine"])], 1)
        yield active
        yield GaugeMetricFamily(
            "appliance_alerts_active_count", "Number of active alerts.", len(a["active"])
        )

    def _outbox(self, o: dict[str, Any]) -> Iterator[Metric]:
        for key, doc in _OUTBOX_COUNTERS:
            yield CounterMetricFamily(f"appliance_outbox_{key}", doc, o.get(key, 0))
        yield GaugeMetricFamily(
            "appliance_outbox_pending", "Records not yet settled.", o["pending"]
        )
        yield GaugeMetricFamily(
            "appliance_outbox_delivered",
            "Delivered telemetry records held for backfill.",
            o.get("delivered", 0),
        )
        yield GaugeMetricFamily(
            "appliance_outbox_oldest_age_seconds",
            "Age of the oldest unsettled record.",
            o["oldest_age_s"],
        )

    def _uplink(self, u: dict[str, Any]) -> Iterator[Metric]:
        app = self._app
        yield GaugeMetricFamily(
            "appliance_mqtt_connected",
            "1 while connected to the broker.",
            int(app.uplink.connected),
        )
        for key, doc in _UPLINK_COUNTERS:
            yield CounterMetricFamily(f"appliance_mqtt_{key}", doc, u.get(key, 0))
        yield GaugeMetricFamily(
            "appliance_mqtt_in_flight", "Records awaiting a PUBACK.", u.get("in_flight", 0)
        )
        rejected = CounterMetricFamily(
            "appliance_mqtt_rejected",
            "Records rejected, per reason (MQTT 5 reason code or local refusal).",
            labels=["reason"],
        )
        for reason, n in sorted(app.uplink.rejected_by_reason().items()):
            rejected.add_metric([reason], n)
        yield rejected

    def _downlink(self, d: dict[str, Any]) -> Iterator[Metric]:
        """The command channel (``stats()["downlink"]``; zeros and no labelled samples when the
        appliance runs without it)."""
        yield GaugeMetricFamily(
            "appliance_downlink_connected",
            "1 while the command channel is connected to the broker.",
            int(bool(d.get("connected"))),
        )
        for key, doc in (
            ("received", "Messages received on the command topics."),
            ("duplicates", "Requests whose id was already answered or under way (not re-run)."),
            ("replies", "Replies published (resent stored replies included)."),
            ("restarts", "In-process pipeline restarts (config.apply and its rollbacks)."),
            ("rollbacks", "config.apply and rules.apply rolled back."),
        ):
            yield CounterMetricFamily(f"appliance_downlink_{key}", doc, d.get(key, 0))
        for name, key, label, doc in (
            ("commands", "commands", "command", "Requests that passed the checks, per command."),
            ("replies_by_code", "codes", "code", "Replies made, per result code."),
            ("refused", "refused", "reason", "Messages refused by the checks, per reason."),
        ):
            family = CounterMetricFamily(f"appliance_downlink_{name}", doc, labels=[label])
            for value, n in sorted(d.get(key, {}).items()):
                family.add_metric([value], n)
            yield family

    def _releases(self, models: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        """Signed model releases per served model (docs/models.md, "Releasing a model")."""
        family = CounterMetricFamily(
            "appliance_model_releases",
            "Model releases per served model and outcome (swapped, refused, rolled_back).",
            labels=["model", "outcome"],
        )
        for name, m in sorted(models.items()):
            r = m["release"]
            for outcome, key in (
                ("swapped", "swaps"),
                ("refused", "refused"),
                ("rolled_back", "rolled_back"),
            ):
                family.add_metric([name, outcome], r[key])
        yield family

    def _api(self) -> Iterator[Metric]:
        by_code, bad = self._api_counters()
        requests = CounterMetricFamily(
            "appliance_api_requests", "HTTP requests answered, per status code.", labels=["code"]
        )
        for code, n in sorted(by_code.items()):
            requests.add_metric([str(code)], n)
        yield requests
        refused = CounterMetricFamily(
            "appliance_api_bad_requests",
            "Requests refused with a 4xx, per reason.",
            labels=["reason"],
        )
        for reason, n in sorted(bad.items()):
            refused.add_metric([reason], n)
        yield refused


class _Fixed(Collector):
    """A collector of metrics already built (one chunk of a scrape)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


#: Samples serialised per chunk: about a millisecond of the event loop each.
CHUNK_SAMPLES = 50


def exposition_chunks(metrics: Iterable[Metric]) -> Iterator[bytes]:
    """The Prometheus text format of ``metrics`` (prometheus-client's ``generate_latest``), one
    chunk of about :data:`CHUNK_SAMPLES` samples per ``next()``: the server yields to the event
    loop between chunks, so a scrape never holds up a poll for more than one chunk."""
    batch: list[Metric] = []
    n = 0
    for m in metrics:
        batch.append(m)
        n += len(m.samples)
        if n >= CHUNK_SAMPLES:
            yield _render(batch)
            batch, n = [], 0
    if batch:
        yield _render(batch)


def _render(batch: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(batch))
    return generate_latest(registry)
