"""Traces as OTLP JSON, the file format Jaeger v2 (and any OTLP receiver) reads, and a check of it.

    python scripts/otlp_json.py docs/trace.otlp.json    # check a file as a trace viewer would; exit 1 on a problem

`to_otlp_json(requests)` turns received ExportTraceServiceRequests into the OTLP/JSON encoding
of the OpenTelemetry protocol spec: lowerCamelCase field names, trace and span ids as hex
strings (not protobuf JSON's base64), enums as integers, 64-bit integers as decimal strings.
Such a file is what `POST /v1/traces` of an OTLP/HTTP receiver takes (Jaeger v2 / all-in-one on
4318; docs/deploy.md).

`check_trace(doc)` asserts what a Jaeger-compatible viewer needs to draw one trace: every
resource names its service (`service.name`, not the SDK's `unknown_service` fallback); ids are
well-formed and non-zero; every span's parent is a span of the same trace (Jaeger flags the
rest as "invalid parent span IDs" and draws them detached); one root per trace; end >= start.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HEX32, HEX16 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{16}")


def _hex_ids(obj: Any) -> Any:
    """protobuf JSON's base64 bytes -> the hex ids OTLP/JSON requires (spans, links, events)."""
    if isinstance(obj, list):
        return [_hex_ids(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str):
            out[k] = base64.b64decode(v).hex()
        else:
            out[k] = _hex_ids(v)
    return out


def to_otlp_json(requests: list, *, trace_id: str | None = None) -> dict:
    """ExportTraceServiceRequests -> {"resourceSpans": [...]} (only `trace_id`'s spans when given)."""
    from google.protobuf.json_format import MessageToDict

    resource_spans = []
    for req in requests:
        for rs in _hex_ids(MessageToDict(req, use_integers_for_enums=True)).get("resourceSpans", []):
            scopes = []
            for ss in rs.get("scopeSpans", []):
                spans = [s for s in ss.get("spans", []) if trace_id is None or s.get("traceId") == trace_id]
                if spans:
                    scopes.append({**ss, "spans": spans})
            if scopes:
                resource_spans.append({**rs, "scopeSpans": scopes})
    return {"resourceSpans": resource_spans}


def _attr(attributes: list[dict], key: str) -> Any:
    for kv in attributes or []:
        if kv.get("key") == key:
            return next(iter((kv.get("value") or {}).values()), None)
    return None


def spans_of(doc: dict) -> list[dict]:
    """Every span, flattened, with its resource's service name under "service"."""
    out = []
    for rs in doc.get("resourceSpans", []):
        service = _attr((rs.get("resource") or {}).get("attributes", []), "service.name")
        for ss in rs.get("scopeSpans", []):
            out += [{**s, "service": service} for s in ss.get("spans", [])]
    return out


def check_trace(doc: dict) -> list[str]:
    problems: list[str] = []
    if not isinstance(doc.get("resourceSpans"), list) or not doc["resourceSpans"]:
        return ["no resourceSpans: not an OTLP/JSON trace export"]
    for i, rs in enumerate(doc["resourceSpans"]):
        service = _attr((rs.get("resource") or {}).get("attributes", []), "service.name")
        if not isinstance(service, str) or not service or service.startswith("unknown_service"):
            problems.append(
                f"resourceSpans[{i}]: service.name is {service!r}: the viewer lists it as an unknown service"
            )
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for s in spans_of(doc):
        name = f"span {s.get('name')!r} ({s.get('service')})"
        tid, sid, pid = s.get("traceId", ""), s.get("spanId", ""), s.get("parentSpanId", "")
        if not HEX32.fullmatch(tid) or set(tid) == {"0"}:
            problems.append(f"{name}: traceId {tid!r} is not 32 hex digits, non-zero")
        if not HEX16.fullmatch(sid) or set(sid) == {"0"}:
            problems.append(f"{name}: spanId {sid!r} is not 16 hex digits, non-zero")
        if pid and not HEX16.fullmatch(pid):
            problems.append(f"{name}: parentSpanId {pid!r} is not 16 hex digits")
        if not s.get("name"):
            problems.append(f"{name}: no name")
        start, end = str(s.get("startTimeUnixNano", "")), str(s.get("endTimeUnixNano", ""))
        if not (start.isdigit() and end.isdigit()) or int(end) < int(start):
            problems.append(f"{name}: start {start!r} / end {end!r}: not nanosecond times with end >= start")
        if s.get("kind", 0) not in range(6):
            problems.append(f"{name}: kind {s.get('kind')!r} is not an OTLP SpanKind number")
        by_trace[tid].append(s)
    for tid, spans in by_trace.items():
        ids = [s.get("spanId") for s in spans]
        if len(ids) != len(set(ids)):
            problems.append(f"trace {tid}: duplicate span ids")
        for s in spans:
            if s.get("parentSpanId") and s["parentSpanId"] not in ids:
                problems.append(
                    f"trace {tid}: span {s.get('name')!r} ({s.get('service')}) has parent "
                    f"{s['parentSpanId']}, which is not in the trace"
                )
        roots = [s for s in spans if not s.get("parentSpanId")]
        if len(roots) != 1:
            problems.append(f"trace {tid}: {len(roots)} root spans {[r.get('name') for r in roots]}; one expected")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    doc = json.loads(args.path.read_text())
    problems = check_trace(doc)
    for p in problems:
        print(f"FAIL {p}")
    spans = spans_of(doc)
    print(
        f"{args.path}: {len(spans)} spans, {len({s['traceId'] for s in spans})} trace(s), services "
        f"{sorted({str(s['service']) for s in spans})}: {'ok' if not problems else f'{len(problems)} problem(s)'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
