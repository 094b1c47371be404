"""OpenTelemetry for every Engram process: traces and metrics, set up once at process entry.

    tel = setup_telemetry("engram-shard", metrics_port=args.metrics_port)   # first thing in main
    ...
    tel.shutdown()                                                          # flushes; last thing

The standard `OTEL_*` variables mean what the OpenTelemetry specification says, and the SDK
reads them itself (endpoints, OTEL_EXPORTER_OTLP_PROTOCOL grpc | http/protobuf, _INSECURE,
_HEADERS, _TIMEOUT, _CERTIFICATE, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG),
OTEL_BSP_*, OTEL_METRIC_EXPORT_INTERVAL, OTEL_PYTHON_GRPC_EXCLUDED_SERVICES). Ours on top:

    no OTLP endpoint set                    no OTLP export (the SDK would dial localhost:4317)
    OTEL_METRICS_EXPORTER                   otlp (default) | prometheus | none, comma-separated: Jaeger takes
                                            traces only, so compose and k8s scrape Prometheus instead
    bad values                              a ConfigError naming the variable (the SDK only logs a warning)
    OTEL_PYTHON_GRPC_EXCLUDED_SERVICES      default: health checks and reflection (probes are noise)

With no endpoint and no Prometheus port nothing is installed: `span()` returns a shared null
context, the metric helpers return at once, gRPC and Redis are not patched. With an endpoint: an
SDK TracerProvider with a BatchSpanProcessor and the OTLP exporter, the gRPC client and server
instrumentations and the Redis instrumentation, so a lookup's trace crosses processes through the
gRPC metadata (W3C traceparent). Metrics go over OTLP and/or as Prometheus text on
http://host:port/metrics (`metrics_port`, else OTEL_EXPORTER_PROMETHEUS_PORT, default 9464).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace

from engram.config import ConfigError
from services import metrics, tracing
from services.metrics import (  # noqa: F401  (re-exported: callers record through services.telemetry)
    record_cache,
    record_lookup,
    record_queue_depth,
    record_shard_event,
    record_staleness,
)
from services.tracing import annotate, annotate_rows, enabled, span, traced_task, tracer  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
T = TypeVar("T")

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
PROTOCOLS = ("grpc", "http/protobuf")
METRICS_EXPORTERS = ("otlp", "prometheus", "none")
EXCLUDED_SERVICES = "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection"
TRACER_NAME = "engram"
EXPORT_TIMEOUT_S = 5.0  # bounds shutdown's final flush when the collector is gone, unless *_TIMEOUT is set


def standard_env() -> set[str]:
    """Every OTEL_* variable the OpenTelemetry API/SDK define, plus the gRPC instrumentation's exclusions."""
    import opentelemetry.environment_variables as api_env
    import opentelemetry.sdk.environment_variables as sdk_env

    names = {v for m in (api_env, sdk_env) for k, v in vars(m).items() if k.startswith("OTEL_") and isinstance(v, str)}
    return names | {"OTEL_PYTHON_GRPC_EXCLUDED_SERVICES"}


@dataclass(kw_only=True, slots=True)
class TelemetrySettings:
    """What the OTEL_* environment asks for, checked (no side effects)."""

    service_name: str
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    traces_protocol: str = "grpc"
    metrics_protocol: str = "grpc"
    prometheus: bool = False
    resource_attributes: dict[str, str] = field(default_factory=dict)


def _choice(env: Mapping[str, str], name: str, default: str, *, allowed: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ConfigError(f"{name}: unknown {value!r} (known: {', '.join(allowed)})")
    return value


def settings_from_env(service_name: str, env: Mapping[str, str]) -> TelemetrySettings | None:
    """None when telemetry is off (no endpoint and no Prometheus exporter, or OTEL_SDK_DISABLED=true)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or base
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        traces = None
    exporters = {e.strip().lower() for e in env.get("OTEL_METRICS_EXPORTER", "otlp").split(",") if e.strip()}
    for e in sorted(exporters - set(METRICS_EXPORTERS)):
        raise ConfigError(f"OTEL_METRICS_EXPORTER: unsupported {e!r} (known: {', '.join(METRICS_EXPORTERS)})")
    metrics = (env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip() or base) if "otlp" in exporters else None
    if traces is None and metrics is None and "prometheus" not in exporters:
        return None
    protocol = _choice(env, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", allowed=PROTOCOLS)
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if sampler.endswith("traceidratio") and raw:
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a ratio in [0, 1], got {raw!r}")
    attrs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"OTEL_RESOURCE_ATTRIBUTES: expected key=value pairs, got {item!r}")
        attrs[key.strip()] = value.strip()
    return TelemetrySettings(
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or service_name,
        traces_endpoint=traces,
        metrics_endpoint=metrics,
        prometheus="prometheus" in exporters,
        resource_attributes=attrs,
        traces_protocol=_choice(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol, allowed=PROTOCOLS),
        metrics_protocol=_choice(env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol, allowed=PROTOCOLS),
    )


@contextlib.contextmanager
def _otel_environ(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ's OTEL_* replaced by `env`'s while the SDK reads them (it reads os.environ only)."""
    if env is os.environ:
        yield
        return
    saved = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith("OTEL_")})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[k]
        os.environ.update(saved)


def _sampler():
    """The SDK's OTEL_TRACES_SAMPLER choice, minus root CLIENT spans.

    A client call with no operation around it (a shard's Redis heartbeat every second, a
    background poll) would be a one-span trace of its own: noise in Jaeger. Every operation
    worth a trace opens a span first (lookup, train step, a served request), and client calls
    inside it are kept.
    """
    from opentelemetry.sdk.trace import sampling

    chosen = sampling._get_from_env_or_default()  # the SDK's own reading of OTEL_TRACES_SAMPLER(_ARG)

    class NoOrphanClientSpans(sampling.Sampler):
        def should_sample(  # noqa: PLR0917 (the SDK's Sampler interface: it calls this positionally)
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
        ):
            parent = otel_trace.get_current_span(parent_context).get_span_context()
            if kind == otel_trace.SpanKind.CLIENT and not parent.is_valid:
                return sampling.SamplingResult(sampling.Decision.DROP)
            return chosen.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"NoOrphanClientSpans{{{chosen.get_description()}}}"

    return NoOrphanClientSpans()


def _exporter(signal: str, protocol: str, endpoint: str) -> Any:
    """The SDK's OTLP exporter for `signal`; it reads insecure/headers/timeout/certificate from OTEL_*."""
    classes: tuple[Any, Any]
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc import metric_exporter, trace_exporter

        classes = trace_exporter.OTLPSpanExporter, metric_exporter.OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
        from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

        classes = http_traces.OTLPSpanExporter, http_metrics.OTLPMetricExporter
        if endpoint == os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():  # the base URL + /v1/<signal>
            endpoint = f"{endpoint.rstrip('/')}/v1/{signal}"
    timed = any(os.environ.get(f"OTEL_EXPORTER_OTLP{s}_TIMEOUT") for s in ("", f"_{signal.upper()}"))
    kwargs: dict[str, Any] = {"endpoint": endpoint} | ({} if timed else {"timeout": EXPORT_TIMEOUT_S})
    return classes[0 if signal == "traces" else 1](**kwargs)


class Telemetry:
    """What `setup_telemetry` installed; `shutdown()` flushes and removes it."""

    def __init__(
        self,
        service_name: str,
        *,
        tracer_provider=None,
        meter_provider=None,
        instrumentors: tuple = (),
        metrics_server=None,
    ) -> None:
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
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        return all([p.force_flush(int(timeout_s * 1000)) for p in providers])

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
        tracing.set_tracer(None)
        metrics.uninstall()


def setup_telemetry(
    service_name: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    attributes: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    metrics_tls: tuple[str, str] | None = None,
) -> Telemetry:
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
    if tracing.enabled() or metrics.active():
        raise RuntimeError("setup_telemetry: already set up in this process; call shutdown() first")
    with _otel_environ(env):
        return _install(
            service_name,
            settings,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            attributes=attributes or {},
            metrics_tls=metrics_tls,
        )


def _install(
    service_name: str,
    settings: TelemetrySettings | None,
    *,
    metrics_port: int | None,
    metrics_host: str,
    attributes: Mapping[str, Any],
    metrics_tls: tuple[str, str] | None = None,
) -> Telemetry:
    from opentelemetry.sdk.resources import Resource

    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (which wins over ours)
    ours = {**attributes, "process.pid": os.getpid()}
    if not os.environ.get("OTEL_SERVICE_NAME", "").strip():
        ours["service.name"] = service_name
    resource = Resource.create(ours)
    name = str(resource.attributes.get("service.name", service_name))
    tracer_provider = meter_provider = server = None
    instrumentors: list = []
    readers: list = []
    if metrics_port is None and settings is not None and settings.prometheus:
        metrics_port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        metrics_host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", metrics_host)
    if metrics_port is not None:  # first: a port in use must leave nothing installed
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        if not 0 <= metrics_port < 65536:
            raise ConfigError(f"--metrics-port: {metrics_port} is not a TCP port")
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        try:
            certfile, keyfile = metrics_tls or (None, None)
            server = start_http_server(
                metrics_port, addr=metrics_host, registry=registry, certfile=certfile, keyfile=keyfile
            )
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port: cannot serve Prometheus metrics on {metrics_host}:{metrics_port}: {exc}"
            ) from None
    if settings is not None and settings.traces_endpoint:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource, sampler=_sampler())
        tracer_provider.add_span_processor(
            BatchSpanProcessor(_exporter("traces", settings.traces_protocol, settings.traces_endpoint))
        )
        if not _global_is_set(otel_trace.get_tracer_provider()):
            otel_trace.set_tracer_provider(tracer_provider)  # for libraries that trace through the global API
        instrumentors = _instrument(tracer_provider)
        tracing.set_tracer(tracer_provider.get_tracer(TRACER_NAME))
    if settings is not None and settings.metrics_endpoint:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(
            PeriodicExportingMetricReader(_exporter("metrics", settings.metrics_protocol, settings.metrics_endpoint))
        )
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        if not _global_is_set(otel_metrics.get_meter_provider()):
            otel_metrics.set_meter_provider(meter_provider)
        metrics.install(meter_provider.get_meter(TRACER_NAME))
    tel = Telemetry(
        name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        instrumentors=tuple(instrumentors),
        metrics_server=server,
    )
    log.info(
        "telemetry: service=%s traces=%s metrics=%s prometheus_port=%s",
        name,
        settings.traces_endpoint if settings else None,
        settings.metrics_endpoint if settings else None,
        tel.metrics_port,
    )
    return tel


def _global_is_set(provider: Any) -> bool:
    return type(provider).__name__ not in ("ProxyTracerProvider", "_ProxyMeterProvider", "ProxyMeterProvider")


def _instrument(tracer_provider) -> list:
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        GrpcInstrumentorClient,
    )
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # the instrumentors read OTEL_PYTHON_GRPC_EXCLUDED_SERVICES when they are built; probes are noise
    os.environ.setdefault("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", EXCLUDED_SERVICES)
    done = []
    # the sync gRPC client too (scripts and tools with sync stubs; the trainer uses the async ShardClient)
    for inst in (
        GrpcAioInstrumentorServer(),
        GrpcAioInstrumentorClient(),
        GrpcInstrumentorClient(),
        RedisInstrumentor(),
    ):
        inst.instrument(tracer_provider=tracer_provider)
        done.append(inst)
    return done
