"""Engram's metric instruments and the helpers that record through them (one attribute check when off).

services/telemetry.py installs them on its MeterProvider (`install`) and removes them at shutdown.
"""

from __future__ import annotations

from opentelemetry import metrics as otel_metrics

LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Instruments:
    """The metric instruments of one meter; every helper below writes through these."""

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.lookup_latency = meter.create_histogram(
            "engram.lookup.duration",
            unit="s",
            description="latency of one lookup (client: all shards; shard: one request)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.rows = meter.create_counter(
            "engram.lookup.rows", unit="{row}", description="rows looked up; rate() gives rows/s"
        )
        self.cache_hits = meter.create_counter(
            "engram.cache.hits", unit="{row}", description="rows served from the worker's row cache"
        )
        self.cache_requests = meter.create_counter(
            "engram.cache.requests", unit="{row}", description="rows asked of the worker's row cache"
        )
        self.cache_hit_ratio = meter.create_gauge(
            "engram.cache.hit_ratio", unit="1", description="hits / requests of the last batch"
        )
        self.staleness = meter.create_gauge(
            "engram.staleness", unit="{step}", description="optimizer steps a lookup's rows lag the trainer"
        )
        self.queue_depth = meter.create_gauge(
            "engram.queue.depth", unit="{request}", description="requests queued or in flight"
        )
        self.shard_events = meter.create_counter(
            "engram.shard.events",
            unit="{event}",
            description="stuck state a shard expired or refused: "
            "event=step_discarded | freeze_lifted | staged_dropped | inflight_refused | bad_request",
        )


_instruments: _Instruments | None = None


def install(meter: otel_metrics.Meter) -> None:
    global _instruments
    _instruments = _Instruments(meter)


def uninstall() -> None:
    global _instruments
    _instruments = None


def active() -> bool:
    return _instruments is not None


def record_lookup(seconds: float, rows: int, *, side: str, table: int | None = None) -> None:
    """One lookup finished: latency histogram + rows counter. side: client | shard."""
    if _instruments is None:
        return
    attrs: dict[str, str | int] = {"side": side} if table is None else {"side": side, "table": table}
    _instruments.lookup_latency.record(seconds, attrs)
    _instruments.rows.add(rows, attrs)


def record_cache(hits: int, requests: int) -> None:
    if _instruments is None or requests <= 0:
        return
    _instruments.cache_hits.add(hits)
    _instruments.cache_requests.add(requests)
    _instruments.cache_hit_ratio.set(hits / requests)


def record_staleness(steps: int, *, table: int | None = None) -> None:
    if _instruments is None:
        return
    _instruments.staleness.set(steps, {} if table is None else {"table": table})


def record_shard_event(event: str, count: int = 1) -> None:
    if _instruments is None or count <= 0:
        return
    _instruments.shard_events.add(count, {"event": event})


def record_queue_depth(depth: int, *, queue: str) -> None:
    if _instruments is None:
        return
    _instruments.queue_depth.set(depth, {"queue": queue})
