"""The control plane's shard registry (heartbeats, liveness keys), checkpoint manifests and failover events.

A mixin of `ControlPlane` (store.py: the Redis client, signing, key names); keys are listed there.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from services.control.records import ShardRecord, TamperedEntry
from services.control.security import Tampered, TamperLog

T = TypeVar("T")
MANIFEST_HISTORY = 20


class RegistryOps:
    _r: aioredis.Redis
    namespace: str
    tampered: TamperLog

    if TYPE_CHECKING:  # ControlPlane's

        def _key(self, *parts: object) -> str: ...

        def _pack(self, where: str, value: Any) -> bytes: ...

        def _unpack(self, where: str, data: bytes) -> Any: ...

        def _current(self, where: str, data: Any) -> Any: ...

        def _verified_or(self, where: str, data: Any, what: str) -> Any: ...

        async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T: ...

    # ---------------------------------------------------------------------------------------
    # failover events

    async def add_event(self, event: dict, *, keep: int = 200) -> None:
        """Append a failover/repair event (what happened, when) to `{ns}:failover:events`."""
        key = self._key("failover", "events")
        data = self._pack(key, event)

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.lpush(self._key("failover", "events"), data)
                pipe.ltrim(self._key("failover", "events"), 0, keep - 1)
                await pipe.execute()

        await self._call("recording a failover event", run)

    async def events(self) -> list[dict]:
        """The failover/repair events, newest first."""
        raw: list[Any] = await self._call(
            "reading failover events", lambda: self._r.lrange(self._key("failover", "events"), 0, -1)
        )
        key = self._key("failover", "events")
        out = []
        for d in raw:
            try:
                out.append(self._unpack(key, d))
            except Tampered as exc:
                self.tampered.note(key, exc, "event ignored")
        return out

    # ---------------------------------------------------------------------------------------
    # shard registry

    async def register_shard(self, shard_id: int, address: str, info: dict, *, ttl_s: float) -> None:
        now = time.time()
        record = {"address": address, "info": info, "last_seen": now, "registered_at": now}

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self._key("shards"), str(shard_id), self._pack(self._record_key(shard_id), record))
                pipe.set(self._key("alive", shard_id), b"1", px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

        await self._call(f"registering shard {shard_id}", run)

    def _record_key(self, shard_id: int | str) -> str:
        return f"{self._key('shards')}#{shard_id}"

    async def heartbeat(self, shard_id: int, info: dict, *, ttl_s: float) -> None:
        """Refresh the liveness key and the shard's info.

        Raises LookupError when the shard is not registered (e.g. Redis restarted empty): the
        caller registers again.
        """

        async def run() -> None:
            data = await self._r.hget(self._key("shards"), str(shard_id))
            record = self._current(self._record_key(shard_id), data)  # tampered: register again
            if record is None:
                raise LookupError(f"shard {shard_id} is not registered in cluster {self.namespace!r}")
            record.update(info=info, last_seen=time.time())
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self._key("shards"), str(shard_id), self._pack(self._record_key(shard_id), record))
                pipe.set(self._key("alive", shard_id), b"1", px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

        await self._call(f"sending the heartbeat of shard {shard_id}", run)

    async def deregister_shard(self, shard_id: int) -> None:
        """Mark a shard dead at once (clean shutdown); its record stays for `shards()`."""
        await self._call(f"deregistering shard {shard_id}", lambda: self._r.delete(self._key("alive", shard_id)))

    async def shards(self) -> list[ShardRecord]:
        """Every shard ever registered, sorted by id; `alive` = its liveness key exists."""

        async def run() -> list[ShardRecord]:
            raw = await self._r.hgetall(self._key("shards"))
            ids = sorted(int(k) for k in raw)
            async with self._r.pipeline(transaction=False) as pipe:
                for shard_id in ids:
                    pipe.exists(self._key("alive", shard_id))
                alive = await pipe.execute() if ids else []
            out = []
            for shard_id, is_alive in zip(ids, alive, strict=True):
                where = self._record_key(shard_id)
                try:
                    record = self._verified_or(where, raw[str(shard_id).encode()], f"record of shard {shard_id}")
                except TamperedEntry:
                    continue  # never verified: as if not registered
                out.append(
                    ShardRecord(
                        shard_id=shard_id,
                        address=record["address"],
                        alive=bool(is_alive),
                        info=record.get("info", {}),
                        last_seen=float(record.get("last_seen", 0.0)),
                    )
                )
            return out

        return await self._call("listing shards", run)

    # ---------------------------------------------------------------------------------------
    # checkpoint manifests

    async def put_manifest(self, manifest: dict) -> None:
        if "step" not in manifest or "files" not in manifest:
            raise ValueError(f"manifest: needs 'step' and 'files', got keys {sorted(manifest)}")
        data = self._pack(self._key("manifest"), manifest)

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self._key("manifest"), data)
                pipe.lpush(self._key("manifests"), data)
                pipe.ltrim(self._key("manifests"), 0, MANIFEST_HISTORY - 1)
                await pipe.execute()

        await self._call("writing the checkpoint manifest", run)

    async def latest_manifest(self) -> dict | None:
        data = await self._call("reading the checkpoint manifest", lambda: self._r.get(self._key("manifest")))
        return None if data is None else self._manifest(data)

    def _manifest(self, data: Any) -> dict | None:
        try:
            return self._unpack(self._key("manifest"), data)
        except Tampered as exc:
            self.tampered.note(self._key("manifest"), exc, "skipping that manifest")
            return None

    async def manifests(self) -> list[dict]:
        """The last MANIFEST_HISTORY manifests, newest first."""
        raw = await self._call("reading the manifest history", lambda: self._r.lrange(self._key("manifests"), 0, -1))
        return [m for m in map(self._manifest, raw) if m is not None]
