"""The worker against real shard processes: logits equal the local table; a stalled shard."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.config import load_config
from engram.model import EngramLM
from proto.worker.v1 import worker_pb2 as pb
from proto.worker.v1 import worker_pb2_grpc
from services.launcher import LocalCluster
from tests import fixtures_tls
from tests.fixtures_procs import cluster_fixture
from tests.worker_proc import WorkerProcess, shared_tiny_checkpoint
from worker.prefetch import PrefetchPipeline
from worker.runtime import check_and_drop_local_tables, remote_source

cluster = cluster_fixture(num_shards=2, overrides=[])
pytestmark = pytest.mark.timeout(90)


def serving_cfg(c: LocalCluster, *extra: str):
    return load_config("tiny", None, [*c.cluster_overrides, *c.client_overrides("read"), *extra])  # a worker: read


@torch.no_grad()
@pytest.mark.parametrize("prefetch", [True, False])
def test_remote_fp32_logits_equal_the_local_table_bitwise(cluster, prefetch) -> None:
    cfg = serving_cfg(cluster, "cluster.wire_dtype=fp32")
    model = EngramLM(cfg, np.arange(cfg.model.vocab_size)).eval()  # fresh tables == a fresh cluster's rows
    ids = torch.randint(0, cfg.model.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    ref, _ = model(ids)
    pipe = PrefetchPipeline(model, remote_source(cfg, torch.device("cpu")), prefetch=prefetch)
    try:
        out, _ = pipe.forward(ids)
        assert torch.equal(out, ref)
        fresh = EngramLM(cfg, np.arange(cfg.model.vocab_size))
        assert check_and_drop_local_tables(fresh, pipe.source) == []  # same rows: no warning
        assert all(t.weight.numel() == 0 for t in fresh.tables.values())  # the local copy is freed
    finally:
        pipe.close()


@torch.no_grad()
def test_remote_bf16_logits_are_within_bf16_rounding(cluster) -> None:
    cfg = serving_cfg(cluster, "cluster.wire_dtype=bf16")
    model = EngramLM(cfg, np.arange(cfg.model.vocab_size)).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref, _ = model(ids)
    pipe = PrefetchPipeline(model, remote_source(cfg, torch.device("cpu")))
    try:
        out, _ = pipe.forward(ids)
        assert not torch.equal(out, ref)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    finally:
        pipe.close()


def test_a_stalled_shard_is_unavailable_and_the_worker_keeps_serving(cluster) -> None:
    checkpoint = shared_tiny_checkpoint()
    sets = [
        f"--set={o}"
        for o in [
            *cluster.cluster_overrides,
            *cluster.client_overrides("read"),
            "worker.row_source=remote",
            "cluster.lookup_timeout_s=1.5",
            # shm would read the stopped shard's memory (docs/consistency.md)
            "cluster.row_path=tcp",
        ]
    ]
    worker = WorkerProcess(checkpoint, *sets).start()
    shard_pid = cluster.shards[0].proc.pid
    try:
        with fixtures_tls.channel(worker.address, "read") as ch:
            stub = worker_pb2_grpc.ModelWorkerStub(ch)
            assert len(stub.Score(pb.ScoreRequest(text="def f(x):"), timeout=30).logprobs) > 0
            assert "WARNING: the cluster's rows of Engram layers [1] differ" in worker.stderr()  # trained != fresh
            os.kill(shard_pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    stub.Score(pb.ScoreRequest(text="def g(y):"), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "rows unavailable" in info.value.details() and "1.5" in info.value.details()
                assert time.monotonic() - t0 < 10
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Generate(pb.GenerateRequest(prompt="def", max_new_tokens=4), timeout=30))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                os.kill(shard_pid, signal.SIGCONT)
            reply = stub.Score(pb.ScoreRequest(text="def h(z):"), timeout=30)
            assert len(reply.logprobs) > 0
    finally:
        worker.kill()
