"""OpenTelemetry for every Engram process: traces and metrics, set up once at process entry.

    tel = setup_telemetry("engram-shard", metrics_port=args.metrics_port)   # first thing in main
    ...
    tel.shutdown()                                                          # flushes; last thing

`setup_telemetry` is the only place that reads the standard `OTEL_*` variables:

    OTEL_SDK_DISABLED=true                  nothing is installed, whatever else is set
    OTEL_EXPORTER_OTLP_ENDPOINT             OTLP/gRPC collector, e.g. http://jaeger:4317; unset -> tracing off
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT      overrides the endpoint for traces only
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT     overrides the endpoint for metrics only
    OTEL_SERVICE_NAME                       service.name (default: the name the process passes)
    OTEL_RESOURCE_ATTRIBUTES                extra resource attributes (k=v,k=v)
    OTEL_TRACES_SAMPLER(_ARG)               always_on | always_off | traceidratio | parentbased_* (default
                                            parentbased_always_on)
    OTEL_METRICS_EXPORTER                   otlp (default) | none: Jaeger takes traces only, so compose and
                                            k8s set none and scrape the Prometheus port instead

With no endpoint (and no metrics port) nothing is installed: `span()` returns a shared null
context, the metric helpers return at once, gRPC and Redis are not patched. With an endpoint:
an SDK TracerProvider with a BatchSpanProcessor and the OTLP/gRPC exporter, the grpc.aio client
and server instrumentations (health checks filtered out) and the Redis instrumentation, so a
lookup's trace crosses processes through the gRPC metadata (W3C traceparent). Metrics go over
OTLP and, when the caller passes `metrics_port`, as Prometheus text on http://host:port/metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace

from engram.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The variables read here; the deploy validator treats every OTEL_* name as read by this module.
OTEL_ENV = (
    "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_METRICS_EXPORTER",
)
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")
TRACER_NAME = "engram"
LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
EXPORT_TIMEOUT_S = 5.0  # bounds shutdown's final flush when the collector is gone (grace periods are 30 s)
_NULL_SPAN = contextlib.nullcontext(otel_trace.INVALID_SPAN)  # reusable: nullcontext holds no state


@dataclass(kw_only=True, slots=True)
class TelemetrySettings:
    """What the OTEL_* environment asks for, parsed and checked (no side effects)."""

    service_name: str
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0
    resource_attributes: dict[str, str] = field(default_factory=dict)


def settings_from_env(service_name: str, env: Mapping[str, str]) -> TelemetrySettings | None:
    """None when telemetry is off (no endpoint, or OTEL_SDK_DISABLED=true)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or base
    metrics_on = env.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
    if metrics_on not in ("otlp", "none"):
        raise ConfigError(f"OTEL_METRICS_EXPORTER: unsupported {metrics_on!r} (otlp or none; Prometheus "
                          "text is served on the process's --metrics-port)")
    metrics = (env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip() or base) if metrics_on == "otlp" else None
    if traces is None and metrics is None:
        return None
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    ratio = 1.0
    if sampler.endswith("traceidratio") and env.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        raw = env["OTEL_TRACES_SAMPLER_ARG"]
        try:
            ratio = float(raw)
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got {raw!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got {raw!r}")
    attrs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"OTEL_RESOURCE_ATTRIBUTES: expected key=value pairs, got {item!r}")
        attrs[key.strip()] = value.strip()
    name = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
    return TelemetrySettings(service_name=name, traces_endpoint=traces, metrics_endpoint=metrics,
                             sampler=sampler, sampler_ratio=ratio, resource_attributes=attrs)


def _sampler(kind: str, ratio: float):
    """The OTEL_TRACES_SAMPLER choice, minus root CLIENT spans.

    A client call with no operation around it (a shard's Redis heartbeat every second, a
    background poll) would be a one-span trace of its own: noise in Jaeger. Every operation
    worth a trace opens a span first (lookup, train step, a served request), and client calls
    inside it are kept.
    """
    from opentelemetry.sdk.trace import sampling

    inner = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
             "traceidratio": sampling.TraceIdRatioBased(ratio)}[kind.removeprefix("parentbased_")]
    chosen = sampling.ParentBased(inner) if kind.startswith("parentbased_") else inner

    class NoOrphanClientSpans(sampling.Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            parent = otel_trace.get_current_span(parent_context).get_span_context()
            if kind == otel_trace.SpanKind.CLIENT and not parent.is_valid:
                return sampling.SamplingResult(sampling.Decision.DROP)
            return chosen.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"NoOrphanClientSpans{{{chosen.get_description()}}}"

    return NoOrphanClientSpans()


def _insecure(endpoint: str) -> bool:
    return not endpoint.lower().startswith("https://")


class _Instruments:
    """The metric instruments of one meter; every helper below writes through these."""

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.lookup_latency = meter.create_histogram(
            "engram.lookup.duration", unit="s", description="latency of one lookup (client: all shards; "
            "shard: one request)", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.rows = meter.create_counter(
            "engram.lookup.rows", unit="{row}", description="rows looked up; rate() gives rows/s")
        self.cache_hits = meter.create_counter("engram.cache.hits", unit="{row}", description="rows served "
                                               "from the worker's row cache")
        self.cache_requests = meter.create_counter("engram.cache.requests", unit="{row}",
                                                   description="rows asked of the worker's row cache")
        self.cache_hit_ratio = meter.create_gauge("engram.cache.hit_ratio", unit="1",
                                                  description="hits / requests of the last batch")
        self.staleness = meter.create_gauge("engram.staleness", unit="{step}",
                                            description="optimizer steps a lookup's rows lag the trainer")
        self.queue_depth = meter.create_gauge("engram.queue.depth", unit="{request}",
                                              description="requests queued or in flight")
        self.shard_events = meter.create_counter(
            "engram.shard.events", unit="{event}", description="stuck state a shard expired or refused: "
            "event=step_discarded | freeze_lifted | staged_dropped | inflight_refused | bad_request")


@dataclass(slots=True)
class _State:
    tracer: Any = None  # opentelemetry Tracer, None when tracing is off
    instruments: _Instruments | None = None


_state = _State()


class Telemetry:
    """What `setup_telemetry` installed; `shutdown()` flushes and removes it."""

    def __init__(self, service_name: str, *, tracer_provider=None, meter_provider=None,
                 instrumentors: tuple = (), metrics_server=None) -> None:
        self.service_name = service_name
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._instrumentors = instrumentors
        self._metrics_server = metrics_server  # (WSGIServer, Thread) of the Prometheus endpoint

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None or self.meter_provider is not None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server[0].server_port if self._metrics_server else None

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        ok = True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(int(timeout_s * 1000)) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(int(timeout_s * 1000)) and ok
        return ok

    def shutdown(self) -> None:
        """Flush spans and metrics, stop exporters, unpatch gRPC/Redis. Safe to call twice."""
        for inst in self._instrumentors:
            with contextlib.suppress(Exception):
                inst.uninstrument()
        self._instrumentors = ()
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
            server.server_close()
            self._metrics_server = None
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                with contextlib.suppress(Exception):
                    provider.shutdown()
        self.tracer_provider = self.meter_provider = None
        _state.tracer = None
        _state.instruments = None


def setup_telemetry(service_name: str, *, metrics_port: int | None = None, metrics_host: str = "0.0.0.0",
                    attributes: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                    metrics_tls: tuple[str, str] | None = None) -> Telemetry:
    """Install tracing/metrics for this process from the OTEL_* environment. Call once, at entry.

    `metrics_port` (a CLI value of the caller; 0 picks a free port) serves Prometheus text even
    when no OTLP endpoint is set. `attributes` are added to the resource (e.g. the shard id).
    `env` defaults to os.environ (tests pass their own). `metrics_tls` = (cert, key): serve the
    metrics over HTTPS (what the shard does with security.tls_enabled).
    """
    env = os.environ if env is None else env
    settings = settings_from_env(service_name, env)
    if settings is None and metrics_port is None:
        return Telemetry(service_name)
    if _state.tracer is not None or _state.instruments is not None:
        raise RuntimeError("setup_telemetry: already set up in this process; call shutdown() first")

    from opentelemetry.sdk.resources import Resource

    name = settings.service_name if settings else (env.get("OTEL_SERVICE_NAME") or service_name)
    extra = settings.resource_attributes if settings else {}
    resource = Resource.create({**extra, **(attributes or {}), "service.name": name, "process.pid": os.getpid()})
    tracer_provider = meter_provider = server = None
    instrumentors: list = []
    readers: list = []
    if metrics_port is not None:  # first: a port in use must leave nothing installed
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        if not 0 <= metrics_port < 65536:
            raise ConfigError(f"--metrics-port: {metrics_port} is not a TCP port")
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        try:
            certfile, keyfile = metrics_tls or (None, None)
            server = start_http_server(metrics_port, addr=metrics_host, registry=registry, certfile=certfile,
                                       keyfile=keyfile)
        except OSError as exc:
            raise ConfigError(f"--metrics-port: cannot serve Prometheus metrics on {metrics_host}:{metrics_port}: "
                              f"{exc}") from None
    if settings is not None and settings.traces_endpoint:
        tracer_provider = _tracer_provider(settings, resource)
        instrumentors = _instrument(tracer_provider)
        _state.tracer = tracer_provider.get_tracer(TRACER_NAME)
    if settings is not None and settings.metrics_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = OTLPMetricExporter(endpoint=settings.metrics_endpoint,
                                      insecure=_insecure(settings.metrics_endpoint), timeout=EXPORT_TIMEOUT_S)
        readers.append(PeriodicExportingMetricReader(exporter))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        if not _global_is_set(otel_metrics.get_meter_provider()):
            otel_metrics.set_meter_provider(meter_provider)
        _state.instruments = _Instruments(meter_provider.get_meter(TRACER_NAME))
    tel = Telemetry(name, tracer_provider=tracer_provider, meter_provider=meter_provider,
                    instrumentors=tuple(instrumentors), metrics_server=server)
    log.info("telemetry: service=%s traces=%s metrics=%s prometheus_port=%s", name,
             settings.traces_endpoint if settings else None, settings.metrics_endpoint if settings else None,
             tel.metrics_port)
    return tel


def _global_is_set(provider: Any) -> bool:
    return type(provider).__name__ not in ("ProxyTracerProvider", "_ProxyMeterProvider", "ProxyMeterProvider")


def _tracer_provider(settings: TelemetrySettings, resource):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    assert settings.traces_endpoint is not None
    provider = TracerProvider(resource=resource, sampler=_sampler(settings.sampler, settings.sampler_ratio))
    exporter = OTLPSpanExporter(endpoint=settings.traces_endpoint, insecure=_insecure(settings.traces_endpoint),
                               timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if not _global_is_set(otel_trace.get_tracer_provider()):
        otel_trace.set_tracer_provider(provider)  # for libraries that trace through the global API
    return provider


def _instrument(tracer_provider) -> list:
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        GrpcInstrumentorClient,
        filters,
    )
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    no_health = filters.negate(filters.health_check())  # probes every few seconds are noise, not traces
    done = []
    # the sync gRPC client too (scripts and tools with sync stubs; the trainer uses the async ShardClient)
    for inst in (GrpcAioInstrumentorServer(filter_=no_health), GrpcAioInstrumentorClient(filter_=no_health),
                 GrpcInstrumentorClient(filter_=no_health), RedisInstrumentor()):
        inst.instrument(tracer_provider=tracer_provider)
        done.append(inst)
    return done


# ---------------------------------------------------------------------------------------------
# helpers for our code: all of them cost one attribute check when telemetry is off


def tracer():
    """The Engram tracer (a no-op tracer when tracing is off)."""
    return _state.tracer if _state.tracer is not None else otel_trace.NoOpTracer()


def enabled() -> bool:
    return _state.tracer is not None


def span(name: str, *, parent: Any = None, **attributes: Any):
    """`with span("prefetch.wait", table=1) as s:` a child of the current span.

    `parent` (a Span) is used when no span is current, so work awaited outside any span still
    joins the trace of the operation it waits for.
    """
    if _state.tracer is None:
        return _NULL_SPAN
    context = None
    if parent is not None and parent.is_recording() and not otel_trace.get_current_span().is_recording():
        context = otel_trace.set_span_in_context(parent)
    return _state.tracer.start_as_current_span(name, context=context, attributes=_clean(attributes))


def traced_task(coro: Coroutine[Any, Any, T], name: str, *, rows: int | None = None, table: int | None = None,
                **attributes: Any) -> tuple[asyncio.Task[T], Any]:
    """Run `coro` as a task inside a span that ends when the task does -> (task, span).

    Calls the task makes (gRPC client spans) become the span's children, although the caller
    goes on at once. With `rows`, the task's duration also goes to the client lookup metrics.
    """
    if _state.tracer is None and _state.instruments is None:
        return asyncio.ensure_future(coro), otel_trace.INVALID_SPAN
    sp = tracer().start_span(name, attributes=_clean({"table": table, "rows": rows, **attributes}))
    with otel_trace.use_span(sp, end_on_exit=False):
        task = asyncio.ensure_future(coro)  # the task copies the context: sp is its current span
    t0 = time.perf_counter()

    def done(t: asyncio.Task) -> None:
        if t.cancelled():
            sp.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, "cancelled"))
        elif t.exception() is not None:
            sp.record_exception(t.exception())
            sp.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, str(t.exception())))
        elif rows is not None:
            record_lookup(time.perf_counter() - t0, rows, side="client", table=table)
        sp.end()

    task.add_done_callback(done)
    return task, sp


def annotate(**attributes: Any) -> None:
    """Set attributes on the current span (e.g. the gRPC server span inside a servicer method)."""
    if _state.tracer is None:
        return
    current = otel_trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_clean(attributes))


def annotate_rows(row_ids: bytes, **attributes: Any) -> None:
    """rows and bytes of packed int64 LE ids (plus `attributes`) on the current span.

    No per-request work beyond a length: this runs on the shard's event loop for every call.
    The unique ratio is known for free where the ids are deduplicated: the client's lookup span.
    """
    if _state.tracer is None or not otel_trace.get_current_span().is_recording():
        return
    annotate(rows=len(row_ids) // 8, bytes=len(row_ids), **attributes)


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """`unique_ratio=0.5` -> {"engram.unique_ratio": 0.5}; None values are dropped."""
    return {(k if "." in k else f"engram.{k}"): v for k, v in attributes.items() if v is not None}


def record_lookup(seconds: float, rows: int, *, side: str, table: int | None = None) -> None:
    """One lookup finished: latency histogram + rows counter. side: client | shard."""
    if _state.instruments is None:
        return
    attrs = {"side": side} if table is None else {"side": side, "table": table}
    _state.instruments.lookup_latency.record(seconds, attrs)
    _state.instruments.rows.add(rows, attrs)


def record_cache(hits: int, requests: int) -> None:
    if _state.instruments is None or requests <= 0:
        return
    _state.instruments.cache_hits.add(hits)
    _state.instruments.cache_requests.add(requests)
    _state.instruments.cache_hit_ratio.set(hits / requests)


def record_staleness(steps: int, *, table: int | None = None) -> None:
    if _state.instruments is None:
        return
    _state.instruments.staleness.set(steps, {} if table is None else {"table": table})


def record_shard_event(event: str, count: int = 1) -> None:
    if _state.instruments is None or count <= 0:
        return
    _state.instruments.shard_events.add(count, {"event": event})


def record_queue_depth(depth: int, *, queue: str) -> None:
    if _state.instruments is None:
        return
    _state.instruments.queue_depth.set(depth, {"queue": queue})
