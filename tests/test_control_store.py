"""ControlPlane against a real redis-server (started per test on a free port)."""

from __future__ import annotations

import asyncio

import pytest

from engram.config import ConfigError, load_config
from engram.layout import even_slot_map
from services.control import ControlPlane, ControlPlaneUnavailable
from services.control.store import redact_url
from tests.fixtures_cluster import free_port, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(coro)


def test_init_config_and_slot_map_roundtrip(redis_server):  # noqa: F811
    cfg = load_config("tiny")

    async def body():
        cp = redis_server.control("t1")
        try:
            sm = await cp.init_cluster(cfg, num_shards=3)
            assert sm.epoch == 1 and sm.owners == even_slot_map(cfg.cluster.num_slots, 3)
            stored = await cp.config()
            assert stored.engram == cfg.engram and stored.cluster.num_shards == 3
            assert (await cp.slot_map()) == sm
            assert sm.slots_of(0) == [s for s, o in enumerate(sm.owners) if o == 0]
            with pytest.raises(ValueError, match="already initialised"):
                await cp.init_cluster(cfg, num_shards=2)
            await cp.register_shard(0, "127.0.0.1:1", {}, ttl_s=5)
            again = await cp.init_cluster(cfg, num_shards=2, force=True)
            assert again.epoch == 1 and set(again.owners) == {0, 1}
            assert await cp.shards() == []  # force wipes the namespace
            with pytest.raises(ValueError, match="num_shards"):
                await cp.init_cluster(cfg, num_shards=cfg.cluster.num_slots + 1, force=True)
        finally:
            await cp.close()

    run(body())


def test_uninitialised_namespace_is_a_clear_error(redis_server):  # noqa: F811
    async def body():
        cp = redis_server.control("empty")
        try:
            with pytest.raises(ConfigError, match="not initialised"):
                await cp.config()
            with pytest.raises(ConfigError, match="no slot map"):
                await cp.slot_map()
            assert await cp.latest_manifest() is None
        finally:
            await cp.close()

    run(body())


def test_set_slot_map_is_compare_and_set(redis_server):  # noqa: F811
    cfg = load_config("tiny")

    async def body():
        cp = redis_server.control("cas")
        try:
            sm = await cp.init_cluster(cfg, num_shards=2)
            owners = list(sm.owners)
            owners[0] = 1
            new = await cp.set_slot_map(owners, expected_epoch=1)
            assert new.epoch == 2 and (await cp.slot_map()).owners == owners
            with pytest.raises(ValueError, match=r"slot map changed \(epoch 2, expected 1\)"):
                await cp.set_slot_map(sm.owners, expected_epoch=1)
            with pytest.raises(ValueError, match="entries"):
                await cp.set_slot_map([0, 1], expected_epoch=2)
            with pytest.raises(ValueError, match=">= 0"):
                await cp.set_slot_map([-1] * len(owners), expected_epoch=2)
            # two writers racing on the same epoch: exactly one wins
            results = await asyncio.gather(
                cp.set_slot_map([0] * len(owners), expected_epoch=2),
                cp.set_slot_map([1] * len(owners), expected_epoch=2),
                return_exceptions=True,
            )
            assert sum(isinstance(r, ValueError) for r in results) == 1
            assert (await cp.slot_map()).epoch == 3
        finally:
            await cp.close()

    run(body())


def test_registry_heartbeat_and_expiry(redis_server):  # noqa: F811
    async def body():
        cp = redis_server.control("reg")
        try:
            await cp.register_shard(1, "127.0.0.1:5001", {"rows": 10}, ttl_s=0.3)
            await cp.register_shard(0, "127.0.0.1:5000", {"rows": 5}, ttl_s=30)
            shards = await cp.shards()
            assert [s.shard_id for s in shards] == [0, 1] and all(s.alive for s in shards)
            assert shards[1].address == "127.0.0.1:5001" and shards[1].info == {"rows": 10}
            await cp.heartbeat(1, {"rows": 11}, ttl_s=0.3)
            assert (await cp.shards())[1].info == {"rows": 11}
            await asyncio.sleep(0.6)  # no heartbeat: the liveness key expires
            shards = await cp.shards()
            assert shards[0].alive and not shards[1].alive and shards[1].last_seen > 0
            with pytest.raises(LookupError, match="shard 7 is not registered"):
                await cp.heartbeat(7, {}, ttl_s=1)
            await cp.deregister_shard(0)
            assert not (await cp.shards())[0].alive
        finally:
            await cp.close()

    run(body())


def test_manifests_latest_and_history(redis_server):  # noqa: F811
    async def body():
        cp = redis_server.control("man")
        try:
            for step in (10, 20):
                await cp.put_manifest({"step": step, "directory": "/ckpt", "files": [{"table": 1, "slot": 0}]})
            assert (await cp.latest_manifest())["step"] == 20
            assert [m["step"] for m in await cp.manifests()] == [20, 10]
            with pytest.raises(ValueError, match="files"):
                await cp.put_manifest({"step": 1})
        finally:
            await cp.close()

    run(body())


def test_namespaces_are_isolated(redis_server):  # noqa: F811
    cfg = load_config("tiny")

    async def body():
        a, b = redis_server.control("a"), redis_server.control("b")
        try:
            await a.init_cluster(cfg, num_shards=2)
            await b.init_cluster(cfg, num_shards=1)
            assert set((await a.slot_map()).owners) == {0, 1}
            assert set((await b.slot_map()).owners) == {0}
        finally:
            await a.close()
            await b.close()

    run(body())


def test_redis_down_is_control_plane_unavailable():
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def body():
        cp = ControlPlane.connect(url, "down", timeout_s=0.5, retries=0)
        try:
            with pytest.raises(
                ControlPlaneUnavailable, match=rf"control plane at {url} is unreachable while reading the slot map"
            ):
                await cp.slot_map()
            with pytest.raises(ControlPlaneUnavailable, match="sending the heartbeat of shard 3"):
                await cp.heartbeat(3, {}, ttl_s=1)
        finally:
            await cp.close()

    run(body())


def test_redis_restart_loses_registration_and_client_recovers(redis_server):  # noqa: F811
    async def body():
        cp = redis_server.control("rs", timeout_s=0.5, retries=0)
        try:
            await cp.register_shard(0, "h:1", {}, ttl_s=10)
            redis_server.stop()
            with pytest.raises(ControlPlaneUnavailable, match="listing shards"):
                await cp.shards()
            redis_server.start()
            with pytest.raises(LookupError):  # restarted empty: the shard must register again
                await cp.heartbeat(0, {}, ttl_s=10)
            await cp.register_shard(0, "h:1", {}, ttl_s=10)
            assert (await cp.shards())[0].alive
        finally:
            await cp.close()

    run(body())


def test_redact_url_hides_password():
    assert redact_url("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
