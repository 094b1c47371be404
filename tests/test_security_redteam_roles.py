"""The red-team list of issue 12, the attacks on roles: an unauthenticated ApplyGradients at
lr=50 and admin RPCs without the admin role, against a standalone shard with auth on and bearer
tokens over plaintext (the trusted-network case, the one without TLS; tests/test_tls_cluster.py
covers the same over mTLS). The rest of the list is tests/test_security_redteam.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from engram.config import load_config
from engram.layout import table_layouts
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.wire import pack_ids
from tests.fixtures_cluster import ShardProcess, shard_procs  # noqa: F401
from tests.test_security_redteam import TABLE, refused

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------------------
# roles (issue 12 part A): a shard with auth on; the attacker has no credentials, or the wrong role


TOKENS = {"read": "r" * 24, "train": "t" * 24, "admin": "a" * 24}


def _auth_shard(tmp_path: Path, shard_procs: list) -> ShardProcess:  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{role} {tok}\n" for role, tok in TOKENS.items()))
    shard = ShardProcess(
        [
            "--preset",
            "tiny",
            "--standalone",
            "--shard-id",
            "0",
            "--port",
            "0",
            "--set",
            "cluster.num_shards=1",
            "--set",
            "security.auth_enabled=true",
            "--set",
            f"security.tokens_file={tokens}",
        ],
        tls=False,  # bearer tokens over plaintext: the trusted-network case
    )
    shard_procs.append(shard)
    shard.start()
    return shard


def _as(role: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[role]}")] if role else []


def test_apply_gradients_at_lr_50_is_refused_without_the_train_role(tmp_path: Path, shard_procs: list) -> None:  # noqa: F811
    shard = _auth_shard(tmp_path, shard_procs)
    with grpc.insecure_channel(shard.address) as ch:
        s = shard_pb2_grpc.MemoryShardStub(ch)
        rows = np.arange(4, dtype=np.int64)
        dim = table_layouts(load_config("tiny", None, ["cluster.num_shards=1"]).engram)[TABLE].dim

        def read() -> bytes:
            return s.Lookup(
                shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=pack_ids(rows), dtype=shard_pb2.FP32),
                timeout=10,
                metadata=_as("read"),
            ).rows

        before = read()
        push = shard_pb2.ApplyGradientsRequest(
            table=TABLE,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=np.ones((4, dim), np.float32).tobytes(),
            step=1,
            optimizer=shard_pb2.OptimizerParams(kind="adam", lr=50.0, beta1=0.9, beta2=0.999, eps=1e-8),
        )
        refused(lambda: s.ApplyGradients(push, timeout=10), grpc.StatusCode.UNAUTHENTICATED, "train")
        refused(
            lambda: s.ApplyGradients(push, timeout=10, metadata=_as("read")), grpc.StatusCode.PERMISSION_DENIED, "train"
        )
        assert read() == before  # nothing was written


def test_admin_rpcs_are_refused_without_the_admin_role(tmp_path: Path, shard_procs: list) -> None:  # noqa: F811
    shard = _auth_shard(tmp_path, shard_procs)
    with grpc.insecure_channel(shard.address) as ch:
        s = shard_pb2_grpc.MemoryShardStub(ch)
        for who, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("train", grpc.StatusCode.PERMISSION_DENIED)):
            md = _as(who)
            for call in (
                lambda md=md: s.SetSlotMap(
                    shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[]), timeout=10, metadata=md
                ),
                lambda md=md: s.MigrateSlots(
                    shard_pb2.MigrateSlotsRequest(slots=[0], target="127.0.0.1:1", epoch=1), timeout=10, metadata=md
                ),
                lambda md=md: s.ImportSlots(iter([]), timeout=10, metadata=md),
            ):
                refused(call, code, "admin")
        # Restore is the trainer's (--resume): a worker or an anonymous caller still cannot roll tables back
        for who, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("read", grpc.StatusCode.PERMISSION_DENIED)):
            md = _as(who)
            refused(lambda md=md: s.Restore(shard_pb2.RestoreRequest(), timeout=10, metadata=md), code, "train")
        stats = s.Stats(shard_pb2.StatsRequest(), timeout=10, metadata=_as("read"))
        assert len(stats.slots) > 0  # no slot was dropped
