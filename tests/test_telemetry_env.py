"""The standard OTEL_* variables as the OpenTelemetry SDK reads them, against real receivers on loopback.

OTEL_EXPORTER_OTLP_PROTOCOL (grpc | http/protobuf), OTEL_EXPORTER_OTLP_INSECURE (an endpoint without a
scheme), OTEL_METRICS_EXPORTER=prometheus (+ OTEL_EXPORTER_PROMETHEUS_PORT), and the deploy validator
accepting standard variables while still catching typos.
"""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from engram.config import ConfigError
from scripts.otlp_receiver import OtlpReceiver
from services import telemetry

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_protocols_and_exporters_are_checked_and_named() -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    s = telemetry.settings_from_env(
        "x", {**base, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}
    )
    assert (s.traces_protocol, s.metrics_protocol) == ("http/protobuf", "grpc")
    for extra, name in (
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_METRICS_EXPORTER": "otlp,statsd"}, "OTEL_METRICS_EXPORTER"),
    ):
        with pytest.raises(ConfigError, match=name):
            telemetry.settings_from_env("x", {**base, **extra})
    only_prometheus = telemetry.settings_from_env("x", {"OTEL_METRICS_EXPORTER": "prometheus"})
    assert only_prometheus is not None and only_prometheus.prometheus and only_prometheus.traces_endpoint is None
    assert (
        telemetry.settings_from_env("x", {**base, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
        is None
    )


def test_grpc_endpoint_without_scheme_needs_otlp_insecure() -> None:
    with OtlpReceiver() as rx:
        hostport = rx.endpoint.removeprefix("http://")
        tel = telemetry.setup_telemetry(
            "engram-test",
            env=_env(
                OTEL_EXPORTER_OTLP_ENDPOINT=hostport, OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_METRICS_EXPORTER="none"
            ),
        )
        try:
            assert tel.tracing
            with telemetry.span("insecure-check"):
                pass
            assert tel.force_flush(10)
            spans = rx.wait_for(lambda s: any(x.name == "insecure-check" for x in s), timeout_s=20)
        finally:
            tel.shutdown()
    assert [s.service for s in spans if s.name == "insecure-check"] == ["engram-test"]


class _OtlpHttp(http.server.BaseHTTPRequestHandler):
    posts: list[tuple[str, str, int]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts.append((self.path, self.headers.get("Content-Type", ""), len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_protobuf_protocol_posts_to_v1_traces() -> None:
    _OtlpHttp.posts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpHttp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tel = telemetry.setup_telemetry(
            "engram-test",
            env=_env(
                OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                OTEL_METRICS_EXPORTER="none",
            ),
        )
        try:
            with telemetry.span("http-check"):
                pass
            assert tel.force_flush(10)
        finally:
            tel.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert _OtlpHttp.posts and _OtlpHttp.posts[0][:2] == ("/v1/traces", "application/x-protobuf")
    assert _OtlpHttp.posts[0][2] > 0


def test_prometheus_metrics_exporter_from_the_environment() -> None:
    port = _free_port()
    tel = telemetry.setup_telemetry(
        "engram-test",
        env=_env(
            OTEL_METRICS_EXPORTER="prometheus",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        ),
    )
    try:
        assert tel.metrics_port == port and not tel.tracing
        telemetry.record_lookup(0.002, 64, side="shard")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        tel.shutdown()
    assert "engram_lookup_rows_total{" in text and 'side="shard"' in text


def test_deploy_validator_accepts_standard_otel_variables_and_catches_typos() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from deploy_common import Checker, Report

    report = Report()
    checker = Checker(ROOT, report, strict=False)
    checker.env(
        [
            "OTEL_EXPORTER_OTLP_INSECURE",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_BSP_SCHEDULE_DELAY",
            "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES",
            "OTEL_EXPORTER_PROMETHEUS_PORT",
        ],
        "compose",
    )
    assert report.problems == []
    checker.env(["OTEL_EXPORTER_OTLP_INSECUR"], "compose")
    assert report.problems == [
        "compose: environment OTEL_EXPORTER_OTLP_INSECUR: not one of the OTEL_* variables "
        "the OpenTelemetry SDK defines (a typo?)"
    ]
