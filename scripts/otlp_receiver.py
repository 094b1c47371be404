"""A real OTLP/gRPC receiver, in-process: what Jaeger's collector does, minus the storage.

    with OtlpReceiver() as rx:                      # listens on a free 127.0.0.1 port
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        ...                                         # processes export spans and metrics to it
        spans = rx.wait_for(lambda s: any(x.name == "lookup" for x in s), timeout_s=20)

It implements opentelemetry-proto's TraceService and MetricsService on a plain (sync) grpc
server, so it is never itself traced by the grpc.aio instrumentation under test. Spans are
flattened to `ReceivedSpan` records (ids as hex, attributes as Python values).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPAN_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass(slots=True)
class ReceivedSpan:
    service: str
    pid: int
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def _attrs(kvs) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        out = []
        for rs in request.resource_spans:
            res = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        ReceivedSpan(
                            service=str(res.get("service.name", "")),
                            pid=int(res.get("process.pid", 0) or 0),
                            name=s.name,
                            kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=_attrs(s.attributes),
                            status_code=s.status.code,
                        )
                    )
        self.rx._add_spans(out, request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request, context):  # noqa: N802
        names = []
        for rm in request.resource_metrics:
            service = str(_attrs(rm.resource.attributes).get("service.name", ""))
            for sm in rm.scope_metrics:
                names.extend((service, m.name) for m in sm.metrics)
        self.rx._add_metrics(names)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """OTLP/gRPC TraceService + MetricsService on 127.0.0.1:<free port>."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []  # as received (OTLP JSON export)
        self._metrics: list[tuple[str, str]] = []  # (service.name, metric name)
        self.exports = 0

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

    def _add_spans(self, spans: list[ReceivedSpan], request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._cond:
            self._spans.extend(spans)
            self._requests.append(request)
            self.exports += 1
            self._cond.notify_all()

    def _add_metrics(self, names: list[tuple[str, str]]) -> None:
        with self._cond:
            self._metrics.extend(names)
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    @property
    def requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        """The ExportTraceServiceRequests as received, resource and scope intact."""
        with self._cond:
            return list(self._requests)

    @property
    def metrics(self) -> list[tuple[str, str]]:
        with self._cond:
            return list(self._metrics)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """Block until `done(spans)` holds; raises TimeoutError listing what did arrive."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not done(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    got = sorted({(s.service, s.name) for s in self._spans})
                    raise TimeoutError(f"OTLP receiver: condition not met in {timeout_s} s; got spans {got}")
                self._cond.wait(timeout=left)
            return list(self._spans)

    def wait_for_metrics(self, done: Callable[[list[tuple[str, str]]], bool], timeout_s: float) -> list:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not done(list(self._metrics)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: metrics not met in {timeout_s} s; got {sorted(set(self._metrics))}"
                    )
                self._cond.wait(timeout=left)
            return list(self._metrics)
