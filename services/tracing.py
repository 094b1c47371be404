"""Spans for our code: `span`, `traced_task`, `annotate` (one attribute check each when tracing is off).

services/telemetry.py hands the tracer over at set-up (`set_tracer`) and takes it back at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from opentelemetry import trace as otel_trace

from services import metrics
from services.metrics import record_lookup

T = TypeVar("T")
_NULL_SPAN = contextlib.nullcontext(otel_trace.INVALID_SPAN)  # reusable: nullcontext holds no state
_tracer: Any = None  # an opentelemetry Tracer, None when tracing is off


def set_tracer(tracer: Any) -> None:
    global _tracer
    _tracer = tracer


def tracer():
    """The Engram tracer (a no-op tracer when tracing is off)."""
    return _tracer if _tracer is not None else otel_trace.NoOpTracer()


def enabled() -> bool:
    return _tracer is not None


def span(name: str, *, parent: Any = None, **attributes: Any):
    """`with span("prefetch.wait", table=1) as s:` a child of the current span.

    `parent` (a Span) is used when no span is current, so work awaited outside any span still
    joins the trace of the operation it waits for.
    """
    if _tracer is None:
        return _NULL_SPAN
    context = None
    if parent is not None and parent.is_recording() and not otel_trace.get_current_span().is_recording():
        context = otel_trace.set_span_in_context(parent)
    return _tracer.start_as_current_span(name, context=context, attributes=_clean(attributes))


def traced_task(
    coro: Coroutine[Any, Any, T], name: str, *, rows: int | None = None, table: int | None = None, **attributes: Any
) -> tuple[asyncio.Task[T], Any]:
    """Run `coro` as a task inside a span that ends when the task does -> (task, span).

    Calls the task makes (gRPC client spans) become the span's children, although the caller
    goes on at once. With `rows`, the task's duration also goes to the client lookup metrics.
    """
    if _tracer is None and not metrics.active():
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
    if _tracer is None:
        return
    current = otel_trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_clean(attributes))


def annotate_rows(row_ids: bytes, **attributes: Any) -> None:
    """rows and bytes of packed int64 LE ids (plus `attributes`) on the current span.

    No per-request work beyond a length: this runs on the shard's event loop for every call.
    The unique ratio is known for free where the ids are deduplicated: the client's lookup span.
    """
    if _tracer is None or not otel_trace.get_current_span().is_recording():
        return
    annotate(rows=len(row_ids) // 8, bytes=len(row_ids), **attributes)


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """`unique_ratio=0.5` -> {"engram.unique_ratio": 0.5}; None values are dropped."""
    return {(k if "." in k else f"engram.{k}"): v for k, v in attributes.items() if v is not None}
