"""R=1 training side of a shard loss: the trainer's shard client fails fast with the real cause.

A killed shard: the error names the shard, the call and UNAVAILABLE. A stopped (SIGSTOP) shard:
noticed through its heartbeat key within ~heartbeat_ttl_s, not at the call's deadline. Both
errors pickle with their message (they cross Ray from a worker to the driver).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time

import numpy as np
import pytest

from engram.config import load_config
from engram.layout import table_layouts
from services.client.errors import ShardError as ClientShardError
from services.client.sync import SyncShardClient
from services.shard.errors import ShardError as ServerShardError
from tests import fixtures_tls
from tests.fixtures_cluster import ShardProcess, redis_server, shard_procs, start_all  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_shard_errors_pickle_with_their_cause():
    import grpc

    errors = [
        ClientShardError(
            grpc.StatusCode.UNAVAILABLE,
            "connection refused",
            address="127.0.0.1:5",
            shard_id=1,
            call="Lookup of table 1",
        ),
        ClientShardError(grpc.StatusCode.ABORTED, "waited", address="a:1", call="ApplyGradients"),
        ServerShardError(grpc.StatusCode.FAILED_PRECONDITION, "step 9 is too far ahead"),
    ]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.code == err.code
    assert "Lookup of table 1 to shard 1 at 127.0.0.1:5 failed: UNAVAILABLE: connection refused" in str(errors[0])


def _cluster(redis, shard_procs, ns: str, *, over: list[str]):  # noqa: F811
    # the trainer's view: its control plane credentials and its "train" certificate
    cfg = load_config(
        "tiny", overrides=[*over, *redis.overrides, f"cluster.namespace={ns}", *fixtures_tls.overrides("train")]
    )

    async def init() -> None:
        cp = redis.control(ns)
        await cp.init_cluster(cfg, num_shards=2)
        await cp.close()

    asyncio.run(init())
    procs = start_all(
        [
            ShardProcess(
                [
                    "--preset",
                    "tiny",
                    *[a for o in redis.overrides for a in ("--set", o)],
                    "--set",
                    f"cluster.namespace={ns}",
                    "--shard-id",
                    str(i),
                ]
            )
            for i in range(2)
        ]
    )
    shard_procs.extend(procs)
    return cfg, procs


def test_killed_shard_fails_fast_with_the_cause(redis_server, shard_procs):  # noqa: F811
    # the client retries UNAVAILABLE (a restarting shard comes back); the heartbeat ends the wait.
    # Over shared memory a client still reads a dead shard's last rows (docs/consistency.md): the
    # network paths are what must fail fast here.
    cfg, procs = _cluster(
        redis_server,
        shard_procs,
        "kill",
        over=[
            "cluster.heartbeat_s=0.2",
            "cluster.heartbeat_ttl_s=1",
            "cluster.lookup_timeout_s=60",
            "cluster.row_path=tcp",
        ],
    )
    table, layout = next(iter(table_layouts(cfg.engram).items()))
    rows = SyncShardClient.connect(cfg)
    try:
        ids = np.arange(layout.num_rows, dtype=np.int64)
        assert rows.lookup(table, ids).result()[0].shape == (layout.num_rows, layout.dim)
        procs[1].kill()
        t0 = time.monotonic()
        with pytest.raises(ClientShardError) as err:
            rows.lookup(table, ids).result()
        assert time.monotonic() - t0 < 6
        assert err.value.code.name == "UNAVAILABLE" and procs[1].address in str(err.value)
        back = pickle.loads(pickle.dumps(err.value))
        assert str(back) == str(err.value) and "shard 1" in str(back)
    finally:
        rows.close()


def test_stopped_shard_is_noticed_by_its_heartbeat(redis_server, shard_procs):  # noqa: F811
    # a 60 s call deadline: only the heartbeat (TTL 1 s) can end the wait early
    cfg, procs = _cluster(
        redis_server,
        shard_procs,
        "stop",
        over=[
            "cluster.heartbeat_s=0.2",
            "cluster.heartbeat_ttl_s=1",
            "cluster.lookup_timeout_s=60",
            "cluster.row_path=tcp",
        ],
    )  # shm reads a stopped shard's memory (docs/consistency.md)
    table, layout = next(iter(table_layouts(cfg.engram).items()))
    rows = SyncShardClient.connect(cfg)
    os.kill(procs[0].proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClientShardError) as err:
            rows.lookup(table, np.arange(layout.num_rows, dtype=np.int64)).result()
        waited = time.monotonic() - t0
        assert waited < 6, waited
        assert err.value.code.name == "UNAVAILABLE" and "stopped heartbeating" in str(err.value)
        assert procs[0].address in str(pickle.loads(pickle.dumps(err.value)))
    finally:
        os.kill(procs[0].proc.pid, signal.SIGCONT)
        rows.close()
