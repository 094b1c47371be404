"""The trace a run produces, exported as OTLP JSON, is what a Jaeger-compatible viewer can draw.

A real run (tests/trace_run.py): a training step in one process, a worker step in another, two
real shard processes, each exporting over OTLP/gRPC to the in-process receiver. Its export as
OTLP JSON (the format Jaeger v2 reads natively) must hold one trace id across run, trainer,
worker and shards, with every parent link intact and every service named.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scripts.otlp_receiver import OtlpReceiver
from tests.trace_run import traced_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from otlp_json import check_trace, spans_of, to_otlp_json  # noqa: E402

SERVER, CLIENT = 2, 3  # OTLP SpanKind numbers


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, dict]:
    with OtlpReceiver() as rx:
        trace_id, requests = traced_run(tmp_path_factory.mktemp("trace"), rx)
    return trace_id, json.loads(json.dumps(to_otlp_json(requests, trace_id=trace_id)))  # as read from a file


@pytest.mark.timeout(300)
def test_run_is_one_trace_across_trainer_worker_and_shards(exported):
    trace_id, doc = exported
    assert check_trace(doc) == []
    spans = spans_of(doc)
    assert {s["traceId"] for s in spans} == {trace_id}
    assert {s["service"] for s in spans} == {"engram-run", "engram-trainer", "engram-worker", "engram-shard"}
    by_id = {s["spanId"]: s for s in spans}

    def parent(s: dict) -> dict:
        return by_id[s["parentSpanId"]]

    root = next(s for s in spans if not s.get("parentSpanId"))
    assert (root["name"], root["service"]) == ("run", "engram-run")
    step = next(s for s in spans if s["name"] == "train.step")
    assert step["service"] == "engram-trainer" and parent(step) is root  # crossed a process via TRACEPARENT
    work = next(s for s in spans if s["name"] == "worker.step")
    assert work["service"] == "engram-worker" and parent(work) is root
    servers = [s for s in spans if s["service"] == "engram-shard" and s["kind"] == SERVER]
    assert {s["name"].rsplit("/", 1)[-1] for s in servers} >= {"Lookup", "ApplyGradients"}
    for server in servers:  # each shard span hangs under the RPC client span of the process that called it
        client = parent(server)
        assert client["kind"] == CLIENT and client["name"] == server["name"]
        assert client["service"] in ("engram-trainer", "engram-worker")
        origin = client
        while origin.get("parentSpanId"):
            origin = parent(origin)
        assert origin is root
    callers = {parent(s)["service"] for s in servers}
    assert callers == {"engram-trainer", "engram-worker"}, "both the trainer and the worker reached the shards"
    lookups = [s for s in spans if s["name"] == "train.lookup"]
    assert lookups and all(parent(s) is step for s in lookups)
    for s in spans:  # OTLP/JSON encoding: hex ids, integer enums, nanoseconds as decimal strings
        assert isinstance(s["startTimeUnixNano"], str) and isinstance(s.get("kind", 0), int)


def test_viewer_check_names_broken_traces(exported):
    """The check itself: a lost parent, a missing service name and a second root are each reported."""
    _, doc = exported
    broken = json.loads(json.dumps(doc))
    victim = next(
        s for rs in broken["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"] if s["name"] == "train.step"
    )
    victim["parentSpanId"] = "00000000000000ff"
    problems = check_trace(broken)
    assert any(
        "span 'train.step' (engram-trainer) has parent 00000000000000ff, which is not in the trace" in p
        for p in problems
    ), problems

    unnamed = json.loads(json.dumps(doc))
    for rs in unnamed["resourceSpans"]:
        rs["resource"]["attributes"] = [a for a in rs["resource"]["attributes"] if a["key"] != "service.name"]
    assert any("service.name is None" in p for p in check_trace(unnamed))

    two_roots = json.loads(json.dumps(doc))
    for rs in two_roots["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for s in ss["spans"]:
                if s["name"] == "worker.step":
                    s.pop("parentSpanId", None)
    assert any("2 root spans" in p for p in check_trace(two_roots))


def test_committed_example_trace_passes_the_viewer_check():
    """docs/trace.otlp.json (made by `python -m tests.trace_run`, linked from docs/deploy.md)."""
    doc = json.loads((ROOT / "docs" / "trace.otlp.json").read_text())
    assert check_trace(doc) == []
    assert {s["service"] for s in spans_of(doc)} == {"engram-run", "engram-trainer", "engram-worker", "engram-shard"}
