"""Traces for real: a lookup through real shard processes, exported over OTLP/gRPC to a real receiver.

The test process is the client (telemetry on, service "engram-test"); LocalCluster starts a real
redis-server and two `python -m services.shard` processes that inherit OTEL_* from the
environment. The receiver must see one trace: lookup (root, client) -> one gRPC client span per
shard -> the shard's server span (another process) carrying rows/bytes/epoch, and prefetch.wait.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from engram.config import ConfigError
from scripts.otlp_receiver import OtlpReceiver
from services import telemetry
from services.client import ShardClient
from services.launcher import LocalCluster
from tests import fixtures_tls
from tests.fixtures_procs import secure_cluster

ROOT = Path(__file__).resolve().parents[1]
RPC = "/engram.shard.v1.MemoryShard/Lookup"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


async def _lookup(cluster: LocalCluster, ids: np.ndarray):
    control = cluster.control()
    client = await ShardClient.connect(control, row_path="grpc", security=cluster.security("read"))  # traced path
    try:
        handle = client.lookup(1, ids)  # the requests leave now
        return await handle, handle.unique_ids
    finally:
        await client.close()
        await control.close()


@pytest.mark.timeout(120)
def test_lookup_trace_spans_processes_with_parent_links(monkeypatch):
    with OtlpReceiver() as rx:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "60000"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # LocalCluster passes the environment to the shards
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        tel = telemetry.setup_telemetry("engram-test", env={**_clean_env(), **env})
        try:
            with secure_cluster([], num_shards=2, log_dir=None, startup_timeout_s=120) as cluster:
                ids = np.concatenate([np.arange(0, 64), np.arange(0, 32)]).astype(np.int64)  # both shards, repeats
                rows, unique = asyncio.run(_lookup(cluster, ids))
                assert tuple(rows.shape) == (
                    96,
                    cluster.cfg.engram.n_embed_per_ngram // cluster.cfg.engram.n_head_per_ngram,
                )
                health = subprocess.run(
                    [
                        *[sys.executable, "-m", "engram_cli.main", "health", "--address", cluster.addresses[0]],
                        *fixtures_tls.sets("read"),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert health.returncode == 0, health.stderr
                assert "SERVING" in health.stdout
                assert tel.force_flush()
                spans = rx.wait_for(lambda got: sum(s.kind == "server" and s.name == RPC for s in got) >= 2, 30)
            # the shards were stopped with SIGTERM: their shutdown flushed their metrics too
            rx.wait_for_metrics(lambda got: ("engram-shard", "engram.lookup.duration") in got, 30)
        finally:
            tel.shutdown()

    roots = [s for s in spans if s.name == "lookup" and s.service == "engram-test"]
    assert len(roots) == 1
    root = roots[0]
    assert root.parent_span_id == "", "the client lookup span is the root of its trace"
    trace = [s for s in spans if s.trace_id == root.trace_id]
    assert len({s.service for s in trace}) >= 2 and {"engram-test", "engram-shard"} <= {s.service for s in trace}
    assert root.attributes["engram.rows"] == unique.size and root.attributes["engram.ids"] == ids.size
    assert root.attributes["engram.unique_ratio"] == round(unique.size / ids.size, 4)

    clients = {s.span_id: s for s in trace if s.kind == "client" and s.name == RPC}
    servers = [s for s in trace if s.kind == "server" and s.name == RPC]
    assert len(clients) >= 2 and all(c.parent_span_id == root.span_id for c in clients.values())
    assert len(servers) == len(clients)
    assert len({s.pid for s in servers}) == 2, "server spans come from both shard processes"
    for server in servers:
        assert server.service == "engram-shard"
        client = clients.get(server.parent_span_id)
        assert client is not None, "a server span's parent is the client RPC span (context crossed processes)"
        assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns
        for key in ("engram.rows", "engram.bytes", "engram.epoch", "engram.table"):
            assert key in server.attributes, key
        assert server.attributes["engram.bytes"] == 8 * server.attributes["engram.rows"]
        assert server.attributes["engram.epoch"] == 1 and server.attributes["engram.table"] == 1
    assert sum(s.attributes["engram.rows"] for s in servers) == unique.size

    waits = [s for s in trace if s.name == "prefetch.wait"]
    assert len(waits) == 1 and waits[0].parent_span_id == root.span_id
    heartbeats = [s for s in spans if s.service == "engram-shard" and s.parent_span_id == "" and s.kind == "client"]
    assert heartbeats == [], "root Redis client spans (heartbeats) are not sampled"


def test_no_endpoint_installs_nothing():
    """A fresh process without OTEL_* endpoint: no SDK loaded, no provider, gRPC unpatched, no-op helpers."""
    code = textwrap.dedent("""
        import sys
        import grpc.aio
        from opentelemetry import trace
        from services import telemetry as t
        original = grpc.aio.insecure_channel
        tel = t.setup_telemetry("engram-test")
        with t.span("lookup", rows=3) as s:
            t.annotate(epoch=1)
            t.annotate_rows(b"\\0" * 16)
        t.record_lookup(0.1, 3, side="client"); t.record_cache(1, 2); t.record_queue_depth(1, queue="q")
        print(tel.enabled, t.enabled(), type(trace.get_tracer_provider()).__name__,
              grpc.aio.insecure_channel is original, t.span("a") is t.span("b"), s.is_recording(),
              any(m.startswith("opentelemetry.sdk") for m in sys.modules))
        tel.shutdown()
    """)
    for extra in ({}, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}):
        r = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**_clean_env(), **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["False", "False", "ProxyTracerProvider", "True", "True", "False", "False"], r.stdout


def test_bad_otel_settings_are_named():
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    for extra, name in (
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ):
        with pytest.raises(ConfigError, match=name):
            telemetry.settings_from_env("x", {**base, **extra})
    s = telemetry.settings_from_env(
        "engram-shard", {**base, "OTEL_SERVICE_NAME": "shard-a", "OTEL_METRICS_EXPORTER": "none"}
    )
    assert (s.service_name, s.traces_endpoint, s.metrics_endpoint) == (
        "shard-a",
        base["OTEL_EXPORTER_OTLP_ENDPOINT"],
        None,
    )


def test_shard_with_bad_telemetry_settings_exits_2(monkeypatch):
    env = {**_clean_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "sometimes"}
    r = subprocess.run(
        [sys.executable, "-m", "services.shard", "--preset", "tiny", "--standalone", "--shard-id", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "engram shard 0: bad configuration: OTEL_TRACES_SAMPLER: unknown sampler 'sometimes'" in r.stderr, r.stderr


def test_prometheus_port_serves_the_metrics():
    tel = telemetry.setup_telemetry("engram-test", metrics_port=0, metrics_host="127.0.0.1", env={})
    try:
        assert tel.enabled and not tel.tracing and tel.metrics_port
        telemetry.record_lookup(0.004, 128, side="client", table=1)
        telemetry.record_cache(3, 4)
        telemetry.record_staleness(2)
        telemetry.record_queue_depth(5, queue="prefetch")
        text = urllib.request.urlopen(f"http://127.0.0.1:{tel.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        tel.shutdown()
    assert "engram_lookup_duration_seconds_bucket{" in text and 'le="0.005"' in text  # seconds buckets
    for line in ("engram_lookup_rows_total{", "engram_cache_hit_ratio{", "engram_staleness{", "engram_queue_depth{"):
        assert line in text, text
    assert 'queue="prefetch"' in text and 'side="client"' in text
