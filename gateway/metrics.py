"""``GET /metrics``: the whole hub in Prometheus text format (prometheus-client).

One registry per hub (no process-global state): a collector reads the components' own counters
at scrape time, plus a histogram of group-commit latency fed by the store's thread.
Exported: live connections; messages in (stored) and out per endpoint; commit latency; the
upstream link's state, backlog (messages, bytes, oldest age) and drops by reason (the store's
byte-cap evictions among them) -- federation.md §1.6: the figures edgeHub does not export; and
per endpoint the messages its enrichments pushed over the size limit (IoT Hub ref §10.4,
reason ``enrichedTooLarge``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from gateway.hub.drops import REASON as ENRICHED_TOO_LARGE
from gateway.store.db import Database
from gateway.store.log import MessageLog

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.core import Metric

    from gateway.api.server import ServiceApi
    from gateway.broker.broker import Broker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("connected", "connecting", "disconnected", "throttled", "paused")
COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class CommitHistogram:
    """Group-commit latencies, counted per bucket from the start (``observe`` is called on
    the store's thread); turned into a Prometheus histogram at a scrape, so the client
    library is imported only by a hub that is scraped (footprint)."""

    def __init__(self, buckets: tuple[float, ...] = COMMIT_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.buckets, seconds)  # the first bound >= seconds (le)
        with self._lock:
            self.counts[index] += 1
            self.sum += seconds

    def family(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip((*map(_bound, self.buckets), "+Inf"), counts):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily("gateway_store_commit_seconds",
                                     "Group-commit transaction latency",
                                     buckets=cumulative, sum_value=total)


def _bound(value: float) -> str:
    return repr(float(value))


class _HubCollector:
    def __init__(self, broker: Broker, log: MessageLog,
                 upstream: Callable[[], dict[str, Any] | None],
                 enriched_drops: Mapping[str, int]) -> None:
        self.broker = broker
        self.log = log
        self.upstream = upstream
        self.enriched_drops = enriched_drops

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        conns = GaugeMetricFamily("gateway_connections", "Open MQTT connections",
                                  labels=["state"])
        conns.add_metric(["open"], len(self.broker.open_connections))
        conns.add_metric(["authenticated"], len(self.broker.live))
        yield conns
        stats = self.log.stats()
        yield CounterMetricFamily("gateway_messages_in", "Messages stored in the log (all kinds)",
                                  value=stats.appended)
        stored = GaugeMetricFamily("gateway_store_messages", "Messages held in the store")
        stored.add_metric([], stats.count)
        yield stored
        nbytes = GaugeMetricFamily("gateway_store_bytes", "Bytes held in the store")
        nbytes.add_metric([], stats.bytes)
        yield nbytes
        yield CounterMetricFamily(
            "gateway_telemetry_billed_messages",
            "Telemetry messages received, as IoT Hub bills them: a pack of readings is one",
            value=self.broker.hub.billed_messages)
        rejected = CounterMetricFamily("gateway_messages_rejected",
                                       "Messages refused (store full)", value=stats.rejected)
        yield rejected
        out = CounterMetricFamily("gateway_messages_out", "Messages delivered, per endpoint",
                                  labels=["endpoint"])
        dropped = CounterMetricFamily("gateway_messages_dropped", "Messages dropped, by reason",
                                      labels=["endpoint", "reason"])
        for reason, n in stats.dropped_total.items():
            dropped.add_metric(["store", reason], n)
        for endpoint, n in sorted(self.enriched_drops.items()):
            dropped.add_metric([endpoint, ENRICHED_TOO_LARGE], n)
        up = self.upstream()
        if up is not None:
            out.add_metric(["$upstream"], up["sent"])
            for reason, n in up["dropped"].items():
                if reason != "store-cap":
                    dropped.add_metric(["$upstream", reason], n)
            state = GaugeMetricFamily("gateway_upstream_state", "1 for the link's current state",
                                      labels=["state"])
            for name in STATES:
                state.add_metric([name], 1 if up["state"] == name else 0)
            yield state
            for name, key, help_ in (
                    ("gateway_upstream_backlog_messages", "backlog", "Messages not yet upstream"),
                    ("gateway_upstream_backlog_bytes", "backlogBytes", "Bytes not yet upstream"),
                    ("gateway_upstream_oldest_age_seconds", "oldestAgeSeconds",
                     "Running age of the oldest message not yet upstream")):
                g = GaugeMetricFamily(name, help_, labels=["route"])
                g.add_metric(["*"], up[key])
                for route, r in up["routes"].items():
                    g.add_metric([route], r[key])
                yield g
        yield out
        yield dropped


class Metrics:
    def __init__(self, db: Database, broker: Broker, log: MessageLog,
                 upstream: Callable[[], dict[str, Any] | None], *,
                 enriched_drops: Mapping[str, int] | None = None) -> None:
        """``enriched_drops``: per endpoint, the messages its enrichments pushed over the
        size limit (:attr:`gateway.hub.drops.EnrichedDrops.counts`, read at each scrape)."""
        self.commit_seconds = CommitHistogram()
        db.on_commit = self.commit_seconds.observe  # called on the store's thread: thread-safe
        self._collector = _HubCollector(broker, log, upstream,
                                        enriched_drops if enriched_drops is not None else {})
        self.registry: Any = None  # the Prometheus registry, made at the first scrape

    def collect(self) -> Iterator[Metric]:
        yield self.commit_seconds.family()
        yield from self._collector.collect()

    def text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self.registry is None:
            self.registry = CollectorRegistry()
            self.registry.register(self)
        return generate_latest(self.registry)

    def add_route(self, api: ServiceApi) -> None:
        from aiohttp import web  # with the service API (gateway.api.lazy)

        async def metrics(request: web.Request) -> web.Response:
            """The hub's metrics in Prometheus text format."""
            return web.Response(body=self.text(), headers={"Content-Type": CONTENT_TYPE})

        api.add_route("GET", "/metrics", "ServiceConnect", metrics)
