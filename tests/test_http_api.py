"""`engram serve`'s OpenAI-compatible HTTP API as a real process: the openai client, curl, 32
concurrent streams, cancel frees KV blocks, bad input, overload, Engram knockout and gates.

The worker runs with TLS and auth on (tests/worker_proc.py): HTTPS, and a client presents a
certificate from the session CA (tests/fixtures_tls.py), as every client here does."""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer

from engram.checkpoint import load_model
from tests import fixtures_tls
from tests.worker_proc import WorkerProcess, shared_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)
MODEL = "engram"


@functools.cache
def tls() -> ssl.SSLContext:
    return fixtures_tls.ssl_context("read")


def _get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, verify=tls(), **kw)


def _post(url: str, **kw) -> httpx.Response:
    return httpx.post(url, verify=tls(), **kw)


def _curl_tls() -> list[str]:
    c = fixtures_tls.bundle()["read"]
    return ["--cacert", str(c.ca), "--cert", str(c.cert), "--key", str(c.key)]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_tiny_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = WorkerProcess(
        checkpoint, "--set", "worker.http_port=0", "--set", "worker.max_queue=64", "--set", "worker.kv_cache_mb=4"
    ).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def client(server):
    http = httpx.Client(verify=tls(), timeout=60)  # the session CA and the read certificate
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, http_client=http)


def metric(server, name: str) -> float:
    text = _get(f"{server.base_url}/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def serving(server) -> None:
    assert _get(f"{server.base_url}/health", timeout=10).status_code == 200
    r = _post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "def", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_models_and_greedy_completion_match_the_checkpoint(server, client, checkpoint) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(
        model=MODEL, prompt="def function_", max_tokens=10, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 10
    model, _, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    ids = tok.encode("def function_").ids
    assert out.usage.prompt_tokens == len(ids)
    new = []
    for lp in choice.logprobs.token_logprobs:  # greedy continuation of the local model, log-prob by log-prob
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + new]))[0][0, -1, : tok.get_vocab_size()], -1)
        new.append(int(logp.argmax()))
        assert lp == pytest.approx(float(logp.max()), abs=1e-4)
    assert choice.text == tok.decode(new)
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs)


def test_streaming_equals_non_streaming(client) -> None:
    kw = dict(
        model=MODEL,
        prompt="class Foo",
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=11,
        extra_body={"ignore_eos": True, "top_k": 50},
    )
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_stop_strings_cut_the_text(client) -> None:
    full = (
        client.completions.create(
            model=MODEL, prompt="def f", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[5:7]
    assert stop
    cut = client.completions.create(
        model=MODEL, prompt="def f", max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server) -> None:
    url = f"{server.base_url}/v1/completions"
    body = json.dumps({"model": MODEL, "prompt": "def", "max_tokens": 4, "stream": True, "ignore_eos": True})
    out = subprocess.run(
        ["curl", "-sN", *_curl_tls(), url, "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert out.returncode == 0 and events[-1] == "[DONE]" and len(events) == 5
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])
    plain = subprocess.run(
        ["curl", "-s", *_curl_tls(), url, "-d", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2})],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(plain.stdout)["choices"][0]["text"] is not None


def test_32_concurrent_streams(server, client) -> None:
    results: dict[int, tuple[int, str | None]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            n, reason = 0, None
            for c in client.completions.create(
                model=MODEL,
                prompt=f"def function_{i}(",
                max_tokens=16,
                stream=True,
                temperature=1.0,
                seed=i,
                extra_body={"ignore_eos": True},
            ):
                n += 1
                reason = c.choices[0].finish_reason or reason
            results[i] = (n, reason)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[:3]
    assert len(results) == 32 and all(r == (16, "length") for r in results.values()), results
    assert metric(server, "engram_kv_cache_blocks_used") == 0


def test_a_disconnected_stream_frees_its_kv_blocks(server) -> None:
    assert metric(server, "engram_kv_cache_blocks_used") == 0
    body = {"model": MODEL, "prompt": "def", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(timeout=30, verify=tls()) as c,
        c.stream("POST", f"{server.base_url}/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert sum(g.startswith("data: ") for g in got) >= 3
        assert metric(server, "engram_kv_cache_blocks_used") > 0  # the stream holds blocks
    deadline = time.monotonic() + 20
    while metric(server, "engram_kv_cache_blocks_used") > 0:
        assert time.monotonic() < deadline, "the cancelled stream kept its KV blocks"
        time.sleep(0.1)
    serving(server)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": MODEL, "prompt": ""}, 400, "prompt: empty"),
        ({"model": MODEL, "prompt": "x " * 200}, 400, "maximum context length is 64"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "`gpt-4` does not exist"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens: expected an integer"),
        ({"model": MODEL, "prompt": ["a", "b"]}, 400, "a batch of 2 prompts"),
        ({"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "token ids must be in"),
        ({"model": MODEL, "prompt": "x", "n": 3}, 400, "n: only n=1"),
        ({"model": MODEL, "prompt": "x", "engram": {"knockout": "yes"}}, 400, "engram.knockout"),
        ({"model": MODEL, "prompt": "x", "engram": {"gates": True}}, 400, "unknown option"),
        ({"prompt": "x"}, 400, "model: missing"),
        ([1, 2], 400, "expected a JSON object"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(server, body, status, *, needle) -> None:
    r = _post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    serving(server)


def test_non_json_and_openai_client_errors(server, client) -> None:
    r = _post(
        f"{server.base_url}/v1/completions",
        content=b"{not json",
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="x", top_p=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    serving(server)


def test_raw_socket_disconnect_mid_request_keeps_serving(server) -> None:
    host, port = server.http.rsplit(":", 1)
    body = json.dumps({"model": MODEL, "prompt": "def", "max_tokens": 300, "stream": True, "ignore_eos": True})
    with tls().wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert b"200 OK" in s.recv(4096)
    with tls().wrap_socket(  # half a body, then gone
        socket.create_connection((host, int(port)), timeout=10), server_hostname=host
    ) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    deadline = time.monotonic() + 20
    while metric(server, "engram_kv_cache_blocks_used") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    serving(server)


def test_knockout_and_gates(client) -> None:
    kw = dict(model=MODEL, prompt="def function_", max_tokens=6, temperature=0, logprobs=0)
    base = client.completions.create(**kw, extra_body={"ignore_eos": True, "engram": {"return_gates": True}})
    gates = base.choices[0].model_extra["engram"]["gates"]  # the extension field, kept by the openai client
    assert len(gates) == 6 and all(set(g) == {"1"} and len(g["1"]) == 1 and 0 < g["1"][0] < 1 for g in gates)
    ko = client.completions.create(**kw, extra_body={"ignore_eos": True, "engram": {"knockout": True}})
    assert ko.choices[0].model_extra["engram"]["knockout"] is True
    assert ko.choices[0].logprobs.token_logprobs[0] != pytest.approx(
        base.choices[0].logprobs.token_logprobs[0], abs=1e-6
    )


def test_overload_gets_429_and_the_server_recovers(checkpoint) -> None:
    proc = WorkerProcess(
        checkpoint, "--set", "worker.http_port=0", "--set", "worker.max_queue=1", "--set", "worker.max_running=1"
    ).start()
    try:
        url = f"{proc.base_url}/v1/completions"
        codes: list[int] = []

        def one() -> None:
            r = _post(url, json={"model": MODEL, "prompt": "def", "max_tokens": 40, "ignore_eos": True}, timeout=60)
            codes.append(r.status_code)
            if r.status_code == 429:
                assert "worker.max_queue=1" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert len(codes) == 8 and 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        serving(proc)
    finally:
        proc.kill()


def test_https_refuses_plaintext_and_clients_without_a_certificate(server) -> None:
    assert server.base_url.startswith("https://")
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port: no HTTP answer
        httpx.get(f"http://{server.http}/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a server certificate from another CA is not trusted
        httpx.get(f"{server.base_url}/health", timeout=10, verify=True)
    ca_only = ssl.create_default_context(cafile=str(fixtures_tls.bundle()["read"].ca))
    with pytest.raises(httpx.HTTPError):  # the CA but no client certificate: mTLS refuses
        httpx.get(f"{server.base_url}/health", timeout=10, verify=ca_only)
    serving(server)


def test_plaintext_http_on_a_public_address_is_refused(checkpoint) -> None:
    proc = WorkerProcess(checkpoint, "--host", "0.0.0.0", "--set", "worker.http_port=0", tls=False)
    proc.launch()
    assert proc.proc is not None and proc.proc.wait(timeout=120) != 0
    err = proc.stderr()
    assert "without TLS; refusing" in err and "allow_plaintext_public" in err, err[-2000:]
