"""The red-team list of issue 12, replayed against real processes: every attack must fail.

One LocalCluster as `engram up` starts it (mTLS and roles, Redis with a generated password, a
signed control plane, two shards, a checkpoint root in a temp folder). The attacker holds even
the admin certificate, so each attack reaches its handler: confinement must not depend on the
role. For the control-plane attacks it is a Redis client that knows the password but not the
cluster key.

Attacks on the roles (an unauthenticated ApplyGradients at lr=50, admin RPCs without the admin
role) are in tests/test_security_redteam_roles.py; tests/test_tls_cluster.py covers them over mTLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path

import grpc
import msgpack
import numpy as np
import pytest
import redis
import torch

from engram.layout import slot_num_rows, table_layouts
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.client import ShardClient
from services.control import ControlPlane, ControlPlaneUnavailable
from services.launcher import LocalCluster
from services.wire import pack_ids
from tests import fixtures_tls
from tests.fixtures_cluster import ShardProcess, shard_procs  # noqa: F401
from tests.fixtures_procs import cluster_fixture, expected_rows, run

cluster = cluster_fixture(num_shards=2, overrides=[])
pytestmark = pytest.mark.timeout(120)
TABLE = 1


_channels: dict[str, grpc.Channel] = {}


def stub(c: LocalCluster, shard: int) -> shard_pb2_grpc.MemoryShardStub:
    """The strongest client: the admin certificate (every RPC gets past the roles to its checks)."""
    address = c.addresses[shard]
    if address not in _channels:
        _channels[address] = fixtures_tls.channel(address, "admin")
    return shard_pb2_grpc.MemoryShardStub(_channels[address])


def refused(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value
    for w in words:
        assert w in err.value.details(), err.value.details()
    return err.value.details()


def password(c: LocalCluster) -> str:
    return c.secrets["redis_password_file"].read_text().strip()


def attacker_redis(c: LocalCluster) -> redis.Redis:
    """Knows the Redis password (say it leaked), not the cluster key."""
    return redis.Redis.from_url(c.redis_url, password=password(c), socket_timeout=5)


def stats(c: LocalCluster, shard: int) -> shard_pb2.StatsResponse:
    return stub(c, shard).Stats(shard_pb2.StatsRequest(), timeout=10)


def rows_of(c: LocalCluster, shard: int, n: int = 64) -> np.ndarray:
    owned = list(stats(c, shard).slots)
    num_slots = c.cfg.cluster.num_slots
    rows = np.arange(table_layouts(c.cfg.engram)[TABLE].num_rows, dtype=np.int64)
    return rows[np.isin(rows % num_slots, owned)][:n]


def lookup(c: LocalCluster, shard: int, rows: np.ndarray) -> bytes:
    return (
        stub(c, shard)
        .Lookup(shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=pack_ids(rows), dtype=shard_pb2.FP32), timeout=10)
        .rows
    )


# ---------------------------------------------------------------------------------------------
# Redis: a password, given by file, never on a command line


def test_redis_without_the_password_is_refused(cluster: LocalCluster) -> None:
    with socket.create_connection((cluster.redis.host, cluster.redis.port), timeout=5) as s:
        s.sendall(b"GET x\r\n")
        assert s.recv(128).startswith(b"-NOAUTH")

    async def main() -> None:
        for pw in (None, "wrong-password"):
            cp = ControlPlane.connect(cluster.redis_url, cluster.namespace, password=pw, timeout_s=1, retries=0)
            with pytest.raises(ControlPlaneUnavailable, match="unreachable while reading the slot map"):
                await cp.slot_map()
            await cp.close()
        good = cluster.control()  # the password from security.redis_password_file
        assert (await good.slot_map()).epoch == 1
        await good.close()

    run(main())
    pw = password(cluster).encode()
    for pid in cluster.pids():  # Redis and every shard: the secret is in no process list
        assert pw not in Path(f"/proc/{pid}/cmdline").read_bytes()


# ---------------------------------------------------------------------------------------------
# the signed control plane


def test_tampered_slot_map_is_ignored_and_reported(cluster: LocalCluster) -> None:
    key = f"{cluster.namespace}:slotmap"
    r = attacker_redis(cluster)
    original = r.get(key)
    ids = np.arange(0, 3000, 7)

    async def main() -> None:
        client = await ShardClient.connect(cluster.control(), row_path="grpc", security=cluster.security("read"))
        try:
            owners = client.owners
            forged = {"epoch": 2, "owners": [0] * len(owners)}  # every slot to shard 0
            for data in (
                msgpack.packb(forged),  # unsigned
                original[:35] + msgpack.packb(forged),  # a valid MAC of the old body, a new body
                original.replace(b"\x01", b"\x02", 1),
            ):  # one bit of the signed entry
                r.set(key, data)
                before = client.control.tampered.total
                assert await client.refresh() == 1 and client.owners == owners  # the verified map stands
                assert client.control.tampered.total == before + 1
                assert torch.equal(await client.lookup(TABLE, ids), expected_rows(client.cfg, TABLE, ids))
            fresh = cluster.control()  # never saw a verified map: refuses to use this one
            with pytest.raises(ControlPlaneUnavailable, match="slot map fails its signature"):
                await ShardClient.connect(fresh, security=cluster.security("read"))
            assert fresh.tampered.total == 1
            await fresh.close()
        finally:
            r.set(key, original)
            await client.close()
            await client.control.close()

    run(main())


def test_overwritten_shard_address_is_ignored_and_repaired(cluster: LocalCluster) -> None:
    key = f"{cluster.namespace}:shards"
    r = attacker_redis(cluster)
    ids = np.arange(0, 3000, 3)
    good = cluster.addresses

    async def main() -> None:
        client = await ShardClient.connect(cluster.control(), row_path="grpc", security=cluster.security("read"))
        try:
            record = msgpack.unpackb(
                r.hget(key, "1")[35:], strict_map_key=False
            )  # shard 1's body (after the ES1 + MAC prefix)
            # the issue's attack: shard 0's entry now says shard 1's address (unsigned; then shard 1's signed entry)
            for data in (msgpack.packb({**record, "address": good[1]}), r.hget(key, "1")):
                r.hset(key, "0", data)
                await client.refresh()
                assert client.addresses[0] == good[0]
                assert torch.equal(await client.lookup(TABLE, ids), expected_rows(client.cfg, TABLE, ids))
            assert client.control.tampered.total >= 1
        finally:
            await client.close()
            await client.control.close()
        # shard 0 notices at its next heartbeat and registers again (signed)
        deadline = time.monotonic() + 10
        while True:
            cp = cluster.control()
            records = {s.shard_id: s.address for s in await cp.shards()}
            await cp.close()
            if records.get(0) == good[0]:
                break
            assert time.monotonic() < deadline, records
            await asyncio.sleep(0.2)

    run(main())
    log = cluster.shards[0].log_path.read_text()  # the shard's heartbeat reported it too
    assert "unsigned entry" in log or "signature does not verify" in log, log[-2000:]


# ---------------------------------------------------------------------------------------------
# file access: checkpoint names under the root, checksums required, no file oracle


def test_checkpoint_writes_only_under_its_root(cluster: LocalCluster, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (cluster.checkpoint_dir / "evil").symlink_to(outside, target_is_directory=True)
    s = stub(cluster, 0)
    for name in ("../escape", str(outside), "ok/../../escape", ".hidden", "a//b", "", "x\x00y"):
        refused(
            lambda n=name: s.Checkpoint(shard_pb2.CheckpointRequest(name=n, step=1), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name:",
        )
    refused(
        lambda: s.Checkpoint(shard_pb2.CheckpointRequest(name="evil/ck", step=1), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "name:",
        "symlink",
    )
    assert list(outside.iterdir()) == [] and not (cluster.checkpoint_dir.parent / "escape").exists()
    files = s.Checkpoint(shard_pb2.CheckpointRequest(name="legit/ck1", step=1), timeout=30).files
    assert files and all((cluster.checkpoint_dir / "legit" / "ck1" / f.path).is_file() for f in files)


def test_restore_needs_checksums_and_is_no_file_oracle(cluster: LocalCluster) -> None:
    s = stub(cluster, 0)
    before = lookup(cluster, 0, rows_of(cluster, 0))
    files = list(s.Checkpoint(shard_pb2.CheckpointRequest(name="oracle", step=1), timeout=30).files)
    no_sum = [shard_pb2.SlotFile(table=f.table, slot=f.slot, path=f.path, sha256="") for f in files]
    refused(
        lambda: s.Restore(shard_pb2.RestoreRequest(name="oracle", files=no_sum), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sha256",
    )
    # the attacker's own bytes in place of a slot file, with their own checksum: refused, nothing echoed
    secret = b"TOPSECRET-" * 8
    victim = cluster.checkpoint_dir / "oracle" / files[0].path
    victim.write_bytes(secret)
    forged = [
        shard_pb2.SlotFile(
            table=f.table, slot=f.slot, path=f.path, sha256=hashlib.sha256(secret).hexdigest() if i == 0 else f.sha256
        )
        for i, f in enumerate(files)
    ]
    text = refused(
        lambda: s.Restore(shard_pb2.RestoreRequest(name="oracle", files=forged), timeout=10), grpc.StatusCode.DATA_LOSS
    )
    assert "TOPSECRET" not in text and "b'" not in text
    for name, path in (
        ("..", files[0].path),
        ("/etc", files[0].path),
        ("oracle", "../../../../etc/passwd"),
        ("oracle", "/etc/passwd"),
    ):
        sneaky = [
            shard_pb2.SlotFile(table=f.table, slot=f.slot, path=path if i == 0 else f.path, sha256=f.sha256)
            for i, f in enumerate(files)
        ]
        text = refused(
            lambda n=name, fs=sneaky: s.Restore(shard_pb2.RestoreRequest(name=n, files=fs), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "root:" not in text and "exist" not in text  # says what was wrong with the request, not the disk
    assert lookup(cluster, 0, rows_of(cluster, 0)) == before


def test_migrate_slots_dials_only_registered_shards(cluster: LocalCluster) -> None:
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen(4)
        trap.settimeout(0.5)
        target = f"127.0.0.1:{trap.getsockname()[1]}"
        slot = int(stats(cluster, 0).slots[0])
        refused(
            lambda: stub(cluster, 0).MigrateSlots(
                shard_pb2.MigrateSlotsRequest(slots=[slot], target=target, epoch=1), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target:",
            "not the address of a live shard registered",
        )
        with pytest.raises(TimeoutError):
            trap.accept()  # the shard never dialled it
    assert slot in stats(cluster, 0).slots


# ---------------------------------------------------------------------------------------------
# hostile values: NaN rows, negative moments, steps from the far future, slot maps that orphan slots


def test_nan_rows_are_refused_by_import_and_apply(cluster: LocalCluster) -> None:
    slot = int(stats(cluster, 0).slots[0])  # shard 1 does not own it: a migration target for it
    layout = table_layouts(cluster.cfg.engram)[TABLE]
    n, dim = slot_num_rows(layout.num_rows, slot, cluster.cfg.cluster.num_slots), layout.dim
    ok = np.zeros((n, dim), np.float32)
    nan = ok.copy()
    nan[n // 2, 1] = np.nan
    neg_v = np.concatenate([ok, -np.ones((n, dim), np.float32)]).tobytes()
    for weights, state, words in (
        (nan, np.zeros(2 * n * dim, np.float32).tobytes(), "weights: non-finite"),
        (ok, neg_v, "negative second moments"),
    ):
        chunk = shard_pb2.SlotChunk(
            table=TABLE,
            slot=slot,
            epoch=1,
            weights=weights.tobytes(),
            state=state,
            applied_step=0,
            last=True,
            offset_rows=0,
        )
        refused(
            lambda c=chunk: stub(cluster, 1).ImportSlots(iter([c]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            *words.split(": "),
        )
    rows = rows_of(cluster, 1, 4)
    before = lookup(cluster, 1, rows)
    grads = np.full((4, dim), np.nan, np.float32)
    refused(
        lambda: stub(cluster, 1).ApplyGradients(
            shard_pb2.ApplyGradientsRequest(
                table=TABLE,
                epoch=1,
                row_ids=pack_ids(rows),
                grads=grads.tobytes(),
                step=1,
                optimizer=shard_pb2.OptimizerParams(kind="adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8),
            ),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    )
    assert lookup(cluster, 1, rows) == before


def test_far_future_step_and_orphaning_slot_maps_are_refused(cluster: LocalCluster) -> None:
    s, rows = stub(cluster, 1), rows_of(cluster, 1, 4)
    dim = table_layouts(cluster.cfg.engram)[TABLE].dim
    applied = stats(cluster, 1).tables[0].applied_step
    with pytest.raises(grpc.RpcError) as err:
        s.ApplyGradients(
            shard_pb2.ApplyGradientsRequest(
                table=TABLE,
                epoch=1,
                row_ids=pack_ids(rows),
                grads=np.ones((4, dim), np.float32).tobytes(),
                step=2**63,
                optimizer=shard_pb2.OptimizerParams(kind="adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8),
            ),
            timeout=10,
        )
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert "max_step_jump" in err.value.details()
    assert stats(cluster, 1).tables[0].applied_step == applied
    owned = list(stats(cluster, 1).slots)
    for epoch in (1, 2):  # drop every slot, at the current epoch and one ahead of the control plane
        refused(
            lambda e=epoch: s.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=e, owned_slots=[]), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    assert list(stats(cluster, 1).slots) == owned and stats(cluster, 1).epoch == 1


# ---------------------------------------------------------------------------------------------
# part A (wt-tls): enable as `test_*` with the roles interceptor; each needs a client without credentials
