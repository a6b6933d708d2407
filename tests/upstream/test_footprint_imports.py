"""The idle footprint: the commit-latency histogram is counted without prometheus-client until a
scrape, and optional pieces are not imported at start."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from gateway.metrics import CommitHistogram

REPO = Path(__file__).resolve().parents[2]


def test_buckets_are_cumulative_and_le_inclusive() -> None:
    h = CommitHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 0.1, 3.0):
        h.observe(seconds)
    [sample_family] = [h.family()]
    samples = {(s.name, s.labels.get("le")): s.value for s in sample_family.samples}
    assert samples[("gateway_store_commit_seconds_bucket", "0.001")] == 2  # 0.0005 and 0.001
    assert samples[("gateway_store_commit_seconds_bucket", "0.01")] == 3
    assert samples[("gateway_store_commit_seconds_bucket", "0.1")] == 5
    assert samples[("gateway_store_commit_seconds_bucket", "+Inf")] == 6
    assert samples[("gateway_store_commit_seconds_count", None)] == 6
    assert abs(samples[("gateway_store_commit_seconds_sum", None)] - 3.1535) < 1e-9


def test_observations_from_threads_are_all_counted() -> None:
    h = CommitHistogram()
    threads = [threading.Thread(target=lambda: [h.observe(0.003) for _ in range(5000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(h.counts) == 20000


def test_the_hub_imports_optional_pieces_only_when_used() -> None:
    """The idle footprint: importing the hub (what ``gateway run`` loads before READY) loads
    no endpoint client, no Prometheus, no Proton, no aiohttp (the service API comes with its
    first connection: gateway.api.lazy), no XML parser (file uploads); they come with their
    first use."""
    code = ("import sys, gateway.cli, gateway.app\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prometheus_client', "
            "'proton', 'cproton', 'fastavro', 'aiomqtt', 'paho', 'aiohttp', 'yarl', "
            "'multidict', 'segno', 'xml', 'pyexpat'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=60).stdout
    assert out.strip() == "[]"
