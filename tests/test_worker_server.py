"""`engram serve` as a real process: Score, Generate, batching, bad input, cancel, clean shutdown."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from engram.checkpoint import load_model
from proto.worker.v1 import worker_pb2 as pb
from proto.worker.v1 import worker_pb2_grpc
from services.errors import Reason, error_reason
from tests import fixtures_tls
from tests.worker_proc import WorkerProcess, shared_tiny_checkpoint

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def checkpoint():
    return shared_tiny_checkpoint()


@pytest.fixture(scope="module")
def worker(checkpoint):
    proc = WorkerProcess(checkpoint, "--set", "worker.max_batch=8", "--set", "worker.batch_timeout_ms=20").start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def stub(worker):
    with worker.channel() as channel:
        yield worker_pb2_grpc.ModelWorkerStub(channel)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_health_and_score_match_the_model(worker, stub, checkpoint) -> None:
    with worker.channel() as ch:
        for service in ("", "engram.worker.v1.ModelWorker"):
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    text = "def function_3(self, value):\n    return value"
    reply = stub.Score(pb.ScoreRequest(text=text), timeout=30)
    model, _, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    ids = tok.encode(text).ids
    assert list(reply.token_ids) == ids and reply.num_tokens == len(ids) and len(reply.logprobs) == len(ids) - 1
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :, : tok.get_vocab_size()], -1)  # (T, V_tok)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(list(reply.logprobs)), expected, rtol=1e-4, atol=1e-4)
    assert reply.total_logprob == pytest.approx(float(expected.sum()), rel=1e-4)


def test_generate_greedy_and_seeded_sampling_are_reproducible(stub) -> None:
    def run(**kw):
        return [m.token_id for m in stub.Generate(pb.GenerateRequest(prompt="def function_", **kw), timeout=30)]

    greedy = run(max_new_tokens=12, temperature=0, ignore_eot=True)
    assert len(greedy) == 12 and run(max_new_tokens=12, temperature=0, ignore_eot=True) == greedy
    sampled = run(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eot=True)
    assert run(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eot=True) == sampled
    msgs = list(stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=3, temperature=0, ignore_eot=True)))
    assert [m.index for m in msgs] == [0, 1, 2] and [m.finish_reason for m in msgs] == ["", "", "length"]
    assert all(m.logprob <= 0 for m in msgs)


def test_concurrent_requests_are_served_together(stub) -> None:
    results: dict[int, list[int]] = {}

    def gen(i: int) -> None:
        req = pb.GenerateRequest(prompt=f"def function_{i}", max_new_tokens=8, temperature=0, ignore_eot=True)
        results[i] = [m.token_id for m in stub.Generate(req, timeout=60)]

    threads = [threading.Thread(target=gen, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    scores = [stub.Score.future(pb.ScoreRequest(text=f"return value * {i}"), timeout=60) for i in range(4)]
    for t in threads:
        t.join(60)
    assert all(len(results[i]) == 8 for i in range(6)) and all(len(s.result().logprobs) > 0 for s in scores)
    alone = [
        m.token_id
        for m in stub.Generate(
            pb.GenerateRequest(prompt="def function_3", max_new_tokens=8, temperature=0, ignore_eot=True), timeout=30
        )
    ]
    assert alone == results[3]  # batching with others does not change greedy output


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(prompt=""), "prompt: empty"),
        (pb.GenerateRequest(prompt="x " * 200), "model.max_seq_len"),
        (pb.GenerateRequest(prompt="x", temperature=-0.5), "temperature"),
        (pb.GenerateRequest(prompt="x", top_p=0.0), "top_p"),
        (pb.GenerateRequest(prompt="x", top_p=1.5), "top_p"),
        (pb.GenerateRequest(prompt="x", top_k=-1), "top_k"),
        (pb.GenerateRequest(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (pb.GenerateRequest(prompt="x", max_new_tokens=100000), "max_new_tokens"),
    ],
)
def test_bad_generate_requests_are_invalid_argument(stub, request_, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    assert error_reason(info.value) == Reason.BAD_REQUEST  # the ErrorInfo reason, as the shards give


def test_bad_score_requests_and_truncation(stub) -> None:
    code, details = code_of(lambda: stub.Score(pb.ScoreRequest(text=""), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text: empty" in details
    code, details = code_of(lambda: stub.Score(pb.ScoreRequest(text="x " * 200), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64 tokens" in details
    reply = stub.Score(pb.ScoreRequest(text="x " * 200, truncate=True), timeout=30)
    assert reply.truncated and reply.num_tokens == 64
    msgs = list(
        stub.Generate(
            pb.GenerateRequest(prompt="x " * 200, truncate=True, max_new_tokens=2, ignore_eot=True), timeout=30
        )
    )
    assert len(msgs) == 2


def test_cancel_mid_stream_stops_generation_and_serves_others(worker, stub) -> None:
    stream = stub.Generate(pb.GenerateRequest(prompt="def", max_new_tokens=500, temperature=0, ignore_eot=True))
    got = [next(stream).token_id for _ in range(3)]
    stream.cancel()
    line = worker.wait_line("CANCELLED ", 20)
    assert 3 <= int(line.split("=")[1]) < 500, (line, worker.lines)
    assert len(got) == 3
    assert len(stub.Score(pb.ScoreRequest(text="def f"), timeout=30).logprobs) > 0


def test_sigterm_finishes_in_flight_requests_then_exits(checkpoint) -> None:
    proc = WorkerProcess(checkpoint, "--grace", "30").start()
    try:
        with proc.channel() as ch:
            stub = worker_pb2_grpc.ModelWorkerStub(ch)
            stream = stub.Generate(pb.GenerateRequest(prompt="def", max_new_tokens=60, temperature=0, ignore_eot=True))
            first = next(stream)
            proc.proc.send_signal(15)
            proc.wait_line("STOPPING", 20)
            rest = list(stream)  # the in-flight stream runs to the end
            assert first.index == 0 and len(rest) == 59 and rest[-1].finish_reason == "length"
            time.sleep(0.2)
            code, _ = code_of(lambda: stub.Score(pb.ScoreRequest(text="def"), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.wait(timeout=30) == 0
        assert proc.wait_line("STOPPED ", 5)
    finally:
        proc.kill()


def test_generation_slides_past_the_context_window(stub) -> None:
    msgs = list(
        stub.Generate(pb.GenerateRequest(prompt="def", max_new_tokens=80, temperature=0, ignore_eot=True), timeout=60)
    )
    assert len(msgs) == 80 and msgs[-1].finish_reason == "length"  # 81 tokens > max_seq_len=64


def test_engram_generate_cli(worker) -> None:
    import subprocess
    import sys

    from tests.worker_proc import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                *[sys.executable, "-m", "engram_cli.main", "generate", *args, "--address", worker.address],
                *fixtures_tls.sets("read"),  # the worker serves mTLS with roles on: a reader's identity
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = cli("def function_", "--max-new-tokens", "5", "--temperature", "0")
    assert ok.returncode == 0 and ok.stdout.startswith("def function_")
    scored = cli("--score", "def f(x):")
    assert scored.returncode == 0 and "total log-prob" in scored.stdout
    bad = cli("x", "--top-p", "2")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: top_p" in bad.stderr and bad.stdout == ""
