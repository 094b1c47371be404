"""The Redis control plane: layout, slot map + epoch, shard registry with heartbeats, manifests.

Every key lives under the cluster namespace (`cfg.cluster.namespace`), so several clusters can
share one Redis. Values are msgpack-encoded.

    {ns}:layout            the Config tree (`Config.to_dict()`) the cluster was initialised with
    {ns}:slotmap           {"epoch": int, "owners": [primary shard per slot],
                            "replicas": [[more holders] per slot]}  (replicas: docs/failover.md)
    {ns}:failover:leader   the shard that runs failover and repair now (a lease)
    {ns}:shards            hash shard id -> {"address", "info", "last_seen", "registered_at"}
    {ns}:alive:{id}        liveness key with a TTL, refreshed by heartbeats (gone = shard dead)
    {ns}:manifest          the latest checkpoint manifest
    {ns}:manifests         the last MANIFEST_HISTORY manifests, newest first

Every Redis failure (connection refused, timeout, a Redis still loading) is raised as
`ControlPlaneUnavailable`, whose message names the Redis URL and the operation.

Security (`from_config`, services/control/security.py): the Redis user and password come from
`security.*` files, never only from the URL; with `security.cluster_key_file` every value is
signed, and a reader ignores an entry that fails its signature: it keeps the last entry it
verified (slot map, layout, a shard's record) or skips it (a manifest, a record it never saw),
logs it and counts it (`tampered`). With nothing verified to fall back on, a tampered layout or
slot map raises `TamperedEntry` (a `ControlPlaneUnavailable`: callers keep what they have).

Here: connecting, signing, the layout, the slot map and the failover lease; the stored values
are in records.py, the shard registry, manifests and failover events in registry.py.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

import services.control.replicas as replica_math
from engram.config import Config, ConfigError, config_from_dict
from engram.layout import even_slot_map
from services.control.records import (  # noqa: F401 - re-exported, as before the split
    ControlPlaneUnavailable,
    ShardRecord,
    SlotMap,
    TamperedEntry,
    redact_url,
)
from services.control.registry import MANIFEST_HISTORY, RegistryOps  # noqa: F401
from services.control.security import Signer, Tampered, TamperLog, open_entry, read_secret, seal

T = TypeVar("T")


def _layout(cfg: Config) -> dict:
    """The layout other processes read: the tree without this process's security section (paths of its secrets)."""
    data = cfg.to_dict()
    data.pop("security", None)
    return data


class ControlPlane(RegistryOps):
    def __init__(self, client: aioredis.Redis, *, url: str, namespace: str, signer: Signer | None = None) -> None:
        if not namespace:
            raise ValueError("namespace: must be a non-empty key prefix")
        self._r = client
        self.url = redact_url(url)
        self.namespace = namespace
        self.signer = signer
        self.tampered = TamperLog(self.url)
        self._verified: dict[str, Any] = {}  # where -> the last value that verified (the fallback)

    @classmethod
    def connect(
        cls,
        url: str,
        namespace: str,
        *,
        timeout_s: float = 2.0,
        retries: int = 1,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        signer: Signer | None = None,
    ) -> ControlPlane:
        """A client for the cluster `namespace` at `url`; connects lazily (first call)."""
        auth: dict[str, Any] = {k: v for k, v in (("username", username), ("password", password)) if v}
        if ca_file:
            if not url.startswith("rediss://"):
                raise ValueError(f"security.redis_ca_file: set, but {redact_url(url)!r} is not a rediss:// URL")
            auth["ssl_ca_certs"] = ca_file
        try:
            client = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
                **auth,
            )
        except ValueError as exc:
            raise ValueError(f"redis url {redact_url(url)!r}: {exc}") from None
        return cls(client, url=url, namespace=namespace, signer=signer)

    @classmethod
    def from_config(cls, cfg: Config, **kw: Any) -> ControlPlane:
        """`connect` with cluster.redis_url/namespace and the credentials and key of `cfg.security`."""
        sec = cfg.security
        password = (
            read_secret(sec.redis_password_file, "security.redis_password_file").decode()
            if sec.redis_password_file
            else None
        )
        signer = Signer.from_file(sec.cluster_key_file) if sec.cluster_key_file else None
        return cls.connect(
            cfg.cluster.redis_url,
            cfg.cluster.namespace,
            username=sec.redis_username or None,
            password=password,
            ca_file=sec.redis_ca_file or None,
            signer=signer,
            **kw,
        )

    # ---------------------------------------------------------------------------------------
    # plumbing

    def _key(self, *parts: object) -> str:
        return ":".join([self.namespace, *map(str, parts)])

    def _pack(self, where: str, value: Any) -> bytes:
        return seal(self.signer, where, msgpack.packb(value, use_bin_type=True))

    def _unpack(self, where: str, data: bytes | str) -> Any:
        """Raises Tampered when the entry fails its signature."""
        raw = data.encode() if isinstance(data, str) else data  # the client returns bytes (no decode_responses)
        return msgpack.unpackb(open_entry(self.signer, where, raw), raw=False, strict_map_key=False)

    def _verified_or(self, where: str, data: Any, what: str) -> Any:
        """A verified value (remembered), else the last verified one, else TamperedEntry; None if absent."""
        if data is None:
            return None
        try:
            value = self._unpack(where, data)
        except Tampered as exc:
            if where in self._verified:
                self.tampered.note(where, exc, f"ignored, keeping the last verified {what}")
                return self._verified[where]
            self.tampered.note(where, exc, "ignored")
            raise TamperedEntry(
                f"control plane at {self.url}: the {what} fails its signature ({exc}); not using it"
            ) from None
        self._verified[where] = value
        return value

    def _current(self, where: str, data: Any) -> Any:
        """For read-modify-write: a tampered entry counts as absent (and is reported)."""
        if data is None:
            return None
        try:
            return self._unpack(where, data)
        except Tampered as exc:
            self.tampered.note(where, exc, "treated as absent, overwriting it")
            return None

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise ControlPlaneUnavailable(f"control plane at {self.url} is unreachable while {what}: {exc}") from exc

    async def ping(self) -> None:
        await self._call("pinging", self._r.ping)

    async def close(self) -> None:
        try:
            await self._r.aclose()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass

    # ---------------------------------------------------------------------------------------
    # layout and slot map

    async def init_cluster(self, cfg: Config, *, num_shards: int, force: bool = False) -> SlotMap:
        """Store the layout and an even slot map at epoch 1.

        An initialised namespace is refused unless `force`, which first deletes every key of
        the namespace (registry, manifests included) and starts again from epoch 1.
        """
        num_slots = cfg.cluster.num_slots
        if not 1 <= num_shards <= num_slots:
            raise ValueError(f"num_shards: must be in 1..{num_slots} (cluster.num_slots), got {num_shards}")
        stored = copy.deepcopy(cfg)
        stored.cluster.num_shards = num_shards
        owners = even_slot_map(num_slots, num_shards)
        replicas = cfg.cluster.replicas
        if not 1 <= replicas <= num_shards:
            raise ValueError(f"cluster.replicas: must be in 1..{num_shards} (the shard count), got {replicas}")
        slot_map = SlotMap(
            epoch=1, owners=owners, replicas=replica_math.place_replicas(owners, replicas) if replicas > 1 else []
        )

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                await pipe.watch(self._key("layout"), self._key("slotmap"))
                current = await pipe.get(self._key("slotmap"))
                if current is not None and not force:
                    old = self._current(self._key("slotmap"), current) or {"epoch": "?", "owners": []}
                    raise ValueError(
                        f"cluster {self.namespace!r} at {self.url} is already initialised (epoch "
                        f"{old['epoch']}, {len(set(old['owners']))} shards); pass force=True to wipe it"
                    )
                stale = [k async for k in pipe.scan_iter(match=self._key("*"), count=500)] if force else []
                pipe.multi()
                if stale:
                    pipe.delete(*stale)
                pipe.set(self._key("layout"), self._pack(self._key("layout"), _layout(stored)))
                pipe.set(self._key("slotmap"), self._pack(self._key("slotmap"), slot_map.to_value()))
                await pipe.execute()

        try:
            await self._call("initialising the cluster", run)
        except WatchError:
            raise ValueError(f"cluster {self.namespace!r} was initialised concurrently; retry") from None
        return slot_map

    async def config(self) -> Config:
        data = await self._call("reading the layout", lambda: self._r.get(self._key("layout")))
        value = self._verified_or(self._key("layout"), data, "layout")
        if value is None:
            raise ConfigError(f"cluster {self.namespace!r} at {self.url} is not initialised: run `engram cluster init`")
        return config_from_dict(value)

    async def slot_map(self) -> SlotMap:
        data = await self._call("reading the slot map", lambda: self._r.get(self._key("slotmap")))
        value = self._verified_or(self._key("slotmap"), data, "slot map")
        if value is None:
            raise ConfigError(f"cluster {self.namespace!r} at {self.url} has no slot map: run `engram cluster init`")
        return SlotMap.from_value(value)

    async def set_slot_map(
        self, owners: list[int], *, expected_epoch: int, replicas: list[list[int]] | None = None
    ) -> SlotMap:
        """Compare-and-set: replace the owners if the epoch is still `expected_epoch`; epoch + 1.

        `replicas` None keeps the stored replica lists, minus any holder that is now the primary."""
        owners = [int(o) for o in owners]
        if any(o < 0 for o in owners):
            raise ValueError(f"owners: shard ids must be >= 0, got {sorted(set(o for o in owners if o < 0))}")
        if replicas is not None:
            if replicas and len(replicas) != len(owners):
                raise ValueError(f"replicas: {len(replicas)} lists for {len(owners)} slots")
            bad = [
                s
                for s, rs in enumerate(replicas)
                if owners[s] in rs or len(set(rs)) != len(rs) or any(h < 0 for h in rs)
            ]
            if bad:
                raise ValueError(f"replicas: slot {bad[0]} lists a shard twice (or the primary, or a negative id)")
        key = self._key("slotmap")

        async def run() -> SlotMap:
            async with self._r.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                data = await pipe.get(key)
                if data is None:
                    raise ValueError(f"cluster {self.namespace!r} at {self.url} has no slot map to change")
                try:
                    current = self._unpack(key, data)
                except Tampered as exc:
                    self.tampered.note(key, exc, "refusing to change it")
                    raise ValueError(f"the slot map at {self.url} fails its signature: not building on it") from None
                if current["epoch"] != expected_epoch:
                    raise ValueError(f"slot map changed (epoch {current['epoch']}, expected {expected_epoch})")
                if len(owners) != len(current["owners"]):
                    raise ValueError(f"owners: {len(owners)} entries, the cluster has {len(current['owners'])} slots")
                if replicas is None:
                    kept = SlotMap.from_value(current).replicas
                    reps = [[h for h in rs if h != owners[s]] for s, rs in enumerate(kept)]
                else:
                    reps = [list(r) for r in replicas]
                new = SlotMap(epoch=expected_epoch + 1, owners=owners, replicas=reps)
                pipe.multi()
                pipe.set(key, self._pack(key, new.to_value()))
                await pipe.execute()
                return new

        try:
            return await self._call("writing the slot map", run)
        except WatchError:
            raise ValueError(f"slot map changed concurrently (expected epoch {expected_epoch})") from None

    async def republish(self, cfg: Config, slot_map: SlotMap | None) -> list[str]:
        """Put back what a Redis restart lost, from a shard's own state -> what was written.

        The layout is written only where it is missing; the slot map where it is missing or at
        an older epoch than `slot_map` (the shard saw a newer map that Redis lost). Never
        overwrites anything newer, so several shards may call this at once.
        """
        layout_key, map_key = self._key("layout"), self._key("slotmap")

        async def run() -> list[str]:
            async with self._r.pipeline(transaction=True) as pipe:
                await pipe.watch(layout_key, map_key)
                has_layout = await pipe.exists(layout_key)
                current = await pipe.get(map_key)
                wrote = []
                pipe.multi()
                if not has_layout:
                    pipe.set(layout_key, self._pack(layout_key, _layout(cfg)))
                    wrote.append("the layout")
                old = self._current(map_key, current)
                if slot_map is not None and (old is None or int(old["epoch"]) < slot_map.epoch):
                    pipe.set(map_key, self._pack(map_key, slot_map.to_value()))
                    wrote.append(f"the slot map (epoch {slot_map.epoch})")
                if wrote:
                    await pipe.execute()
                return wrote

        try:
            return await self._call("re-publishing the layout and slot map", run)
        except WatchError:
            return []  # another shard re-published first

    async def lead(self, shard_id: int, *, ttl_s: float) -> bool:
        """Take or keep the failover leader lease -> whether `shard_id` holds it now."""
        key, ms = self._key("failover", "leader"), max(1, int(ttl_s * 1000))

        async def run() -> bool:
            if await self._r.set(key, str(shard_id), nx=True, px=ms):
                return True
            holder = await self._r.get(key)
            if holder is not None and (holder if isinstance(holder, str) else holder.decode()) == str(shard_id):
                await self._r.pexpire(key, ms)
                return True
            return False

        return await self._call("taking the failover lease", run)
