"""One memory-shard process: boot (standalone or from the control plane), serve, heartbeat, stop.

Boot from the control plane: read the stored layout (the Config the cluster was initialised
with; only redis_url/namespace come from the local config) and the slot map, build the owned
slots, restore them from the newest checkpoint manifest whose files for this shard verify
(falling back through the control plane's manifest history, newest first; the log says
which one it took and why newer ones were skipped), start gRPC, register, then heartbeat
every `cluster.heartbeat_s` with a TTL of `cluster.heartbeat_ttl_s`. A Redis that goes away
later only costs a warning: the shard keeps serving and registers again when Redis is back.
When it registers again it also re-publishes the layout and its slot map if Redis lost
them (a restart without persistence, or AOF's last second), so new clients and shards can
still find the cluster.

Once serving it prints exactly one line to stdout, `READY shard=<id> address=<host:port>`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from engram.config import Config, ConfigError
from engram.layout import even_slot_map
from proto.shard.v1 import shard_pb2
from services.control import ControlPlane, ControlPlaneUnavailable
from services.control.failover import FailoverLoop, rejoin
from services.control.store import SlotMap
from services.grpc_options import enable_reflection, server_options
from services.security import tls
from services.security.interceptor import server_interceptors
from services.shard import memory
from services.shard.dataplane import DataPlane
from services.shard.engine import ShardEngine
from services.shard.errors import BootError, ShardError
from services.shard.servicer import MemoryShardServicer, add_to_server
from services.shard.shm_table import TableMemory, local_host_id
from services.shard.store import ShardStore

log = logging.getLogger("engram.shard")
SERVICE_NAME = "engram.shard.v1.MemoryShard"
LOCAL_FIELDS = ("host_id", "shm_dir", "data_port", "row_mirror", "checkpoint_dir")


@dataclass(kw_only=True, slots=True)
class ServeOptions:
    shard_id: int
    host: str
    port: int = 0
    advertise: str = ""  # host:port others use; default host:port (hostname for 0.0.0.0)
    standalone: bool = False
    threads: int = 0  # worker pool; 0 -> cores + 2, at most 8
    torch_threads: int = 0  # intra-op threads per gather/update; 0 -> cores // 4 (shards share cores)
    grace_s: float = 5.0
    pending_wait_s: float = 60.0  # how long a later step's gradient waits for a pending sync step


def default_threads(cores: int) -> tuple[int, int]:
    return min(8, cores + 2), max(1, cores // 4)


async def _boot_from_control_plane(
    cfg: Config, shard_id: int
) -> tuple[Config, ControlPlane, list[int], int, list[dict]]:
    try:
        cp = ControlPlane.from_config(cfg)
    except ValueError as exc:
        raise BootError(str(exc)) from None
    try:
        stored = await cp.config()
        slot_map = await rejoin(cp, shard_id)  # a restart leaves slots its live replicas hold (docs/failover.md)
        latest = await cp.latest_manifest()
        history = await cp.manifests()
    except (ControlPlaneUnavailable, ConfigError, RuntimeError) as exc:
        await cp.close()
        raise BootError(str(exc)) from None
    stored.cluster.redis_url, stored.cluster.namespace = cfg.cluster.redis_url, cfg.cluster.namespace
    for name in LOCAL_FIELDS:  # where this process runs, not the cluster's layout
        setattr(stored.cluster, name, getattr(cfg.cluster, name))
    stored.security = cfg.security  # this process's certificates and rights, never the stored ones
    manifests, seen = [], set()
    for m in ([latest] if latest else []) + history:  # newest first, each checkpoint once
        key = (m.get("step"), m.get("name"))
        if key not in seen:
            seen.add(key)
            manifests.append(m)
    return stored, cp, slot_map.view_for(shard_id), slot_map.epoch, manifests


async def _restore_manifest(engine: ShardEngine, manifest: dict) -> None:
    try:
        files = [
            shard_pb2.SlotFile(
                **{k: f[k] for k in ("table", "slot", "path", "sha256", "num_rows", "num_bytes") if k in f}
            )
            for f in manifest.get("files", [])
        ]
        req = shard_pb2.RestoreRequest(name=str(manifest.get("name", "")), files=files)
        resp = await engine.restore(req)
    except ShardError as exc:
        raise BootError(
            f"restoring checkpoint step {manifest.get('step')} ({manifest.get('name')}): {exc.message}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise BootError(f"checkpoint step {manifest.get('step')}: malformed manifest ({exc})") from None
    log.info("restored %d slots from checkpoint %s (step %d)", resp.slots_restored, req.name, resp.step)


async def _restore_newest(engine: ShardEngine, manifests: list[dict]) -> None:
    """Restore the newest manifest that verifies; older ones are the fallback -> BootError if none does."""
    reasons = []
    for i, manifest in enumerate(manifests):
        try:
            await _restore_manifest(engine, manifest)
        except BootError as exc:
            reasons.append(str(exc))
            log.warning("cannot boot from checkpoint %d of %d (newest first): %s", i + 1, len(manifests), exc)
            continue
        if i:
            log.warning(
                "booted from an older checkpoint, step %s (%s): the %d newer ones did not verify",
                manifest.get("step"),
                manifest.get("name"),
                i,
            )
        else:
            log.info("booted from the newest checkpoint, step %s (%s)", manifest.get("step"), manifest.get("name"))
        return
    raise BootError(f"none of the {len(manifests)} checkpoint manifests restores: " + "; ".join(reasons))


async def _republish(cp: ControlPlane, engine: ShardEngine, cfg: Config) -> None:
    """Put the layout and this shard's slot map back if the control plane lost them."""
    view = engine.store.view
    smap = SlotMap(epoch=view.epoch, owners=list(view.owners)) if view.owners is not None else None
    if cfg.cluster.replicas > 1:
        smap = None  # a shard's view lists itself for its replica slots: not the cluster's map (docs/failover.md)
    restored = await cp.republish(cfg, smap)
    if restored:
        log.warning(
            "control plane at %s had lost %s: re-published from shard %d (epoch %d)",
            cp.url,
            " and ".join(restored),
            engine.store.shard_id,
            view.epoch,
        )


async def _heartbeat(cp: ControlPlane, engine: ShardEngine, cfg: Config, *, shard_id: int, address: str) -> None:
    ttl, registered, healthy = cfg.cluster.heartbeat_ttl_s, True, True
    while True:
        await asyncio.sleep(cfg.cluster.heartbeat_s)
        try:
            if registered:
                await cp.heartbeat(shard_id, engine.info(), ttl_s=ttl)
            else:
                await _republish(cp, engine, cfg)
                await cp.register_shard(shard_id, address, engine.info(), ttl_s=ttl)
                registered = True
                log.warning("shard %d registered again with the control plane at %s", shard_id, cp.url)
            if not healthy:
                log.warning("control plane at %s is reachable again", cp.url)
            healthy = True
        except LookupError:
            registered = False  # Redis restarted empty: register on the next beat
            log.warning("control plane at %s lost shard %d's registration; registering again", cp.url, shard_id)
        except ControlPlaneUnavailable as exc:
            if healthy:
                log.warning("heartbeat failed, still serving: %s", exc)
            healthy, registered = False, False


async def serve(cfg: Config, opts: ServeOptions, *, ready_out=sys.stdout) -> int:
    """Run one shard until SIGTERM/SIGINT -> exit code (0 clean, 2 could not boot)."""
    cores = os.cpu_count() or 1
    threads, torch_threads = default_threads(cores)
    torch.set_num_threads(opts.torch_threads or torch_threads)
    memory.limit_arenas(2)
    pool = ThreadPoolExecutor(opts.threads or threads, thread_name_prefix="shard")
    cp: ControlPlane | None = None
    manifests: list[dict] = []
    if opts.standalone:
        owners, epoch = even_slot_map(cfg.cluster.num_slots, cfg.cluster.num_shards), 1
        if not 0 <= opts.shard_id < cfg.cluster.num_shards:
            raise BootError(
                f"--shard-id {opts.shard_id} is outside 0..{cfg.cluster.num_shards - 1} (cluster.num_shards)"
            )
    else:
        cfg, cp, owners, epoch, manifests = await _boot_from_control_plane(cfg, opts.shard_id)
    loop = asyncio.get_running_loop()
    tables = TableMemory(
        mirror=cfg.cluster.row_mirror,
        shm_dir=cfg.cluster.shm_dir,
        namespace=cfg.cluster.namespace,
        shard_id=opts.shard_id,
        huge_pages=cfg.cluster.shm_huge_pages,
    )
    # a checkpoint overwrites every owned row (or the shard does not start): skip the init then
    try:
        store = await loop.run_in_executor(
            pool,
            lambda: ShardStore.from_slot_map(
                cfg,
                shard_id=opts.shard_id,
                owners=owners,
                epoch=epoch,
                init_threads=max(1, min(8, cores)),
                init_weights=not manifests,
                memory=tables,
            ),
        )
    except BaseException:
        tables.close()
        raise
    max_bytes = cfg.cluster.max_message_mb << 20
    engine = ShardEngine(
        store, pool=pool, max_message_bytes=max_bytes, pending_wait_s=opts.pending_wait_s, limits=cfg.cluster
    )
    if cp is not None:
        engine.slot_map_source, engine.peers_source = cp.slot_map, cp.shards
    if manifests:
        await _restore_newest(engine, manifests)
    await loop.run_in_executor(pool, memory.trim)  # drop what init and restore left in the arenas
    housekeeping = [asyncio.create_task(engine.trimmer.run(pool)), asyncio.create_task(engine.housekeeping())]

    c = cfg.cluster
    server = grpc.aio.server(
        options=server_options(
            max_message_bytes=max_bytes, keepalive_s=c.keepalive_s, idle_connection_s=c.idle_connection_s
        ),
        maximum_concurrent_rpcs=c.max_concurrent_rpcs,
        interceptors=server_interceptors(cfg.security),
    )
    add_to_server(MemoryShardServicer(engine), server)
    enable_reflection(server, SERVICE_NAME)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    sec = cfg.security
    try:
        port, _ = tls.add_port(server, f"{opts.host}:{opts.port}", sec)
    except RuntimeError as exc:
        raise BootError(f"cannot listen on {opts.host}:{opts.port}: {exc}") from None
    if port == 0:
        raise BootError(f"cannot listen on {opts.host}:{opts.port} (address in use?)")
    host = opts.host if opts.host not in ("0.0.0.0", "::", "[::]", "") else socket.gethostname()
    address = opts.advertise or f"{host}:{port}"
    engine.address = address
    engine.dial = lambda target, options: tls.aio_channel(target, sec, options)  # MigrateSlots -> ImportSlots
    data_plane = DataPlane(
        engine,
        max_reply_bytes=max_bytes,
        ssl=tls.ServerSSL(sec) if sec.tls_enabled else None,
        need_role="read" if sec.auth_enabled else None,
    )
    data_host = opts.host
    if sec.auth_enabled and not sec.tls_enabled and not tls.is_loopback(data_host):
        data_host = "127.0.0.1"  # it cannot check tokens: same-host readers only, the rest take gRPC
        log.warning("data plane on 127.0.0.1 only: with auth on and TLS off it cannot tell who connects")
    try:
        data_port = await data_plane.start(data_host, cfg.cluster.data_port)
    except OSError as exc:
        tables.close()
        raise BootError(f"data plane cannot listen on {opts.host}:{cfg.cluster.data_port}: {exc}") from None
    engine.row_paths = {
        "host_id": local_host_id(cfg.cluster.host_id),
        "data_address": f"{address.rsplit(':', 1)[0]}:{data_port}",
        "shm_files": {str(t): name for t, name in tables.files().items()},
        "shm_token": tables.token.hex(),
        "shm_reason": tables.reason,
    }
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    beat: asyncio.Task | None = None
    if cp is not None:
        try:
            await cp.register_shard(opts.shard_id, address, engine.info(), ttl_s=cfg.cluster.heartbeat_ttl_s)
        except ControlPlaneUnavailable as exc:
            await server.stop(0)
            raise BootError(str(exc)) from None
        beat = asyncio.create_task(_heartbeat(cp, engine, cfg, shard_id=opts.shard_id, address=address))
        if cfg.cluster.replicas > 1:
            housekeeping.append(asyncio.create_task(FailoverLoop(cp, cfg, shard_id=opts.shard_id).run()))
    log.info(
        "shard %d serving %d slots at epoch %d on %s (data plane port %d, tables %s)",
        opts.shard_id,
        len(store.view.owned),
        epoch,
        address,
        data_port,
        tables.dir or f"in private memory: {tables.reason}",
    )
    print(f"READY shard={opts.shard_id} address={address}", file=ready_out, flush=True)

    await stop.wait()
    log.info("shard %d shutting down (grace %.1f s)", opts.shard_id, opts.grace_s)
    await health.enter_graceful_shutdown()
    for task in housekeeping:
        task.cancel()
    if beat is not None:
        beat.cancel()
    if cp is not None:
        try:
            await asyncio.wait_for(cp.deregister_shard(opts.shard_id), timeout=1.0)
        except (ControlPlaneUnavailable, TimeoutError):
            pass
        await cp.close()
    await data_plane.stop()
    await server.stop(opts.grace_s)
    tables.close()
    pool.shutdown(wait=True, cancel_futures=True)
    return 0
