"""`LocalCluster`: a real Redis and N real shard processes on this machine, no Docker.

    with LocalCluster(preset="tiny", num_shards=2) as cluster:       # or `async with`
        cluster.redis_url, cluster.addresses                           # {0: "127.0.0.1:41234", ...}
        cluster.add_shard()                                            # a new, empty shard joins

Used by `engram up`, the tests and the benchmarks. Start: redis-server on a free loopback
port (AOF persistence in the log folder's `redis/`, fsync every second, so a Redis restart
keeps the layout, slot map and manifests) -> `ControlPlane.init_cluster` -> `python -m services.shard` per shard
(`--port 0`, the control plane given with `--set`), each awaited until it prints READY and
its health service says SERVING. Stop: SIGTERM to every shard, wait, SIGKILL stragglers,
then the same for Redis. Children get SIGTERM if this process dies (Linux PDEATHSIG).

`secure=True` (what `engram up` uses): a random Redis password (`requirepass`, in a 0600 config
file, never on a command line) and a cluster key that signs the control plane's entries, both
written to `<log_dir>/secrets/` and passed on as `security.*` file paths (docs/security.md).

With `tls=True` (`engram up`'s default) a throwaway CA and one certificate per identity are
written to the log folder's `tls/` (services/security/certs.py); shards serve mTLS with auth
on, and `security(role)` / `client_overrides(role)` give a client its identity: "admin" (the
CLI), "train" (the trainer), "read" (workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from engram.config import Config, SecurityConfig, load_config
from services.launcher.processes import RedisProcess
from services.launcher.shard_process import ShardProcess

ROOT = Path(__file__).resolve().parents[2]


class LocalCluster:
    def __init__(
        self,
        cfg: Config | None = None,
        *,
        preset: str = "tiny",
        config_file: str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        num_shards: int | None = None,
        replicas: int | None = None,
        namespace: str | None = None,
        host: str = "127.0.0.1",
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        shard_args: list[str] | tuple[str, ...] = (),
        keep_logs: bool | None = None,
        secure: bool = False,
        tls: bool = False,
        certs: dict[str, Any] | None = None,
    ) -> None:
        """`keep_logs`: keep the log folder after a clean stop (default: only a given `log_dir`).

        `secure`: Redis with a generated password and a generated cluster key (see the module doc).
        `tls`: throwaway certificates, mTLS and roles on every shard (see the module docstring).
        `certs`: identities to use instead of generating them (`write_bundle`'s result; implies `tls`)."""
        self.preset, self.config_file, self.overrides = preset, config_file, list(overrides)
        self.cfg = cfg if cfg is not None else load_config(preset, config_file, self.overrides)
        self.num_shards = num_shards or self.cfg.cluster.num_shards
        if replicas is not None:  # each slot on `replicas` shards (docs/failover.md)
            self.cfg.cluster.replicas = replicas
        self.namespace = namespace or f"engram-{uuid.uuid4().hex[:8]}"
        self.host = host
        self.keep_logs = (log_dir is not None) if keep_logs is None else keep_logs
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="engram-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout_s = startup_timeout_s
        self.shard_args = list(shard_args)
        self.tls = tls or certs is not None
        self.certs: dict[str, Any] = dict(certs or {})
        self.redis: RedisProcess | None = None
        self.shards: dict[int, ShardProcess] = {}
        ckpt = Path(self.cfg.cluster.checkpoint_dir)
        self.checkpoint_dir = ckpt if ckpt.is_absolute() else ROOT / ckpt  # the shards run in ROOT
        self.secrets: dict[str, Path] = self._make_secrets() if secure else {}

    def _make_secrets(self) -> dict[str, Path]:
        from services.control.security import new_secret, write_secret

        folder = self.log_dir / "secrets"
        return {
            "redis_password_file": write_secret(folder / "redis-password", new_secret()),
            "cluster_key_file": write_secret(folder / "cluster-key", new_secret()),
        }

    # -----------------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        assert self.redis is not None, "cluster not started"
        return self.redis.url

    @property
    def addresses(self) -> dict[int, str]:
        return {i: p.address for i, p in sorted(self.shards.items())}

    @property
    def cluster_overrides(self) -> list[str]:
        """The `--set` values other commands need to reach this cluster."""
        return [
            f"cluster.redis_url={self.redis_url}",
            f"cluster.namespace={self.namespace}",
            f"cluster.checkpoint_dir={self.checkpoint_dir}",
            *(f"security.{name}={path}" for name, path in sorted(self.secrets.items())),
        ]

    def client_config(self, role: str = "admin") -> Config:
        """This process's config for reaching the cluster as `role` (its credentials, key and certificate)."""
        return load_config(
            self.preset, self.config_file, [*self.overrides, *self.cluster_overrides, *self.client_overrides(role)]
        )

    def client_overrides(self, role: str = "admin") -> list[str]:
        """`--set` values giving a client of this cluster the `role` identity (none without TLS)."""
        if not self.tls:
            return []
        from services.security.certs import overrides

        return overrides(self.certs[role])

    def security(self, role: str = "admin") -> SecurityConfig:
        if not self.tls:
            return SecurityConfig()
        c = self.certs[role]
        return SecurityConfig(
            tls_enabled=True, tls_cert=str(c.cert), tls_key=str(c.key), tls_ca=str(c.ca), auth_enabled=True
        )

    def control(self) -> Any:
        from services.control import ControlPlane

        return ControlPlane.from_config(self.client_config())

    # -----------------------------------------------------------------------------------------
    # start / stop

    def _make_certs(self) -> None:
        if self.tls and not self.certs:
            from services.security.certs import write_bundle

            self.certs = write_bundle(self.log_dir / "tls", hosts=[self.host])

    def start(self) -> LocalCluster:
        try:
            self._make_certs()
            self._start_redis()
            asyncio.run(self._init_cluster())
            self._start_shards(range(self.num_shards))
        except BaseException:
            self.stop()
            raise
        return self

    async def astart(self) -> LocalCluster:
        try:
            self._make_certs()
            await asyncio.to_thread(self._start_redis)
            await self._init_cluster()
            procs = [self._spawn_shard(i) for i in range(self.num_shards)]
            await asyncio.to_thread(self._wait_all, procs)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    def _start_redis(self) -> None:
        self.redis = RedisProcess(
            host=self.host,
            log_path=self.log_dir / "redis.log",
            data_dir=self.log_dir / "redis",
            password_file=self.secrets.get("redis_password_file"),
        ).start()

    async def _init_cluster(self) -> None:
        cp = self.control()
        try:
            await cp.init_cluster(self.cfg, num_shards=self.num_shards)
        finally:
            await cp.close()

    def _spawn_shard(self, shard_id: int) -> ShardProcess:
        if shard_id in self.shards and self.shards[shard_id].proc.poll() is None:
            raise ValueError(f"shard {shard_id} is already running (pid {self.shards[shard_id].pid})")
        cmd = [sys.executable, "-m", "services.shard", "--preset", self.preset]
        if self.config_file:
            cmd += ["--config", self.config_file]
        shard_sec = self.client_overrides("shard")  # shards dial each other (MigrateSlots): admin
        for item in [*self.overrides, *self.cluster_overrides, *shard_sec]:
            cmd += ["--set", item]
        cmd += ["--shard-id", str(shard_id), "--host", self.host, "--port", "0", *self.shard_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = ShardProcess(
            shard_id, cmd, log_path=self.log_dir / f"shard{shard_id}.log", env=env, security=self.security("admin")
        )
        self.shards[shard_id] = proc
        return proc

    def _wait_all(self, procs: list[ShardProcess]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        for p in procs:
            p.wait_ready(max(1.0, deadline - time.monotonic()))
        for p in procs:
            p.wait_serving(max(1.0, deadline - time.monotonic()))

    def _start_shards(self, ids: range | list[int]) -> None:
        self._wait_all([self._spawn_shard(i) for i in ids])

    def add_shard(self, shard_id: int | None = None) -> int:
        """Start one more shard (it registers, owns no slots until a rebalance) -> its id."""
        shard_id = max(self.shards, default=-1) + 1 if shard_id is None else shard_id
        self._start_shards([shard_id])
        return shard_id

    async def aadd_shard(self, shard_id: int | None = None) -> int:
        shard_id = max(self.shards, default=-1) + 1 if shard_id is None else shard_id
        proc = self._spawn_shard(shard_id)
        await asyncio.to_thread(self._wait_all, [proc])
        return shard_id

    def stop_shard(self, shard_id: int, grace_s: float = 10.0) -> int | None:
        return self.shards[shard_id].stop(grace_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every shard at once, then Redis; SIGKILL whatever outlives `grace_s`."""
        for p in self.shards.values():
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGCONT)
                    p.proc.send_signal(signal.SIGTERM)
        codes = [p.stop(grace_s) for p in self.shards.values()]
        if self.redis is not None:
            self.redis.stop()
        if not self.keep_logs and all(c in (0, None) for c in codes):
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        out = [p.pid for p in self.shards.values()]
        if self.redis is not None and self.redis.proc is not None:
            out.append(self.redis.proc.pid)
        return out

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LocalCluster:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
