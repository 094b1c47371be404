"""A seeded corpus of malformed, random and adversarial requests for every MemoryShard RPC.

Each case is a `Case(rpc, payload, note)`: `payload` is raw bytes (a unary request) or a list
of raw byte strings (a client stream), sent through gRPC generic calls so malformed bytes
reach the shard unparsed. Three families, mixed at random:

- raw: random bytes, or a valid request with bytes flipped, cut or appended;
- hostile: well-formed messages whose every field is out of range (steps and epochs near
  2^64, NaN hyper-parameters, foreign or negative rows, num_parts near 2^32, lookups whose
  reply would be larger than a message, slot maps that orphan slots, migrations to
  nowhere, import streams that lie about sizes, restores from files that are not slot files);
- valid writes: `valid_step` builds a well-formed update with hostile-but-legal values
  (the test records which ones the shard accepted and replays them on a reference).

Nothing here dials anything but the two shards' loopback addresses and closed loopback ports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proto.shard.v1 import shard_pb2

SERVICE = "/engram.shard.v1.MemoryShard/"
STREAMING = {"ImportSlots"}
RPCS = (
    "Lookup",
    "ApplyGradients",
    "Checkpoint",
    "Restore",
    "MigrateSlots",
    "ImportSlots",
    "SetSlotMap",
    "Stats",
)
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
I32 = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class Case:
    rpc: str
    payload: bytes | list[bytes]
    note: str


@dataclass(slots=True)
class Target:
    """What the corpus knows about one shard."""

    address: str
    table: int
    dim: int
    num_rows: int
    num_slots: int
    owned: list[int]
    peer: str  # the other shard's address
    closed_port: int  # a loopback port nothing listens on
    scratch: str  # a checkpoint name (under the shard's checkpoint root) hostile checkpoints may use


class Corpus:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    # ---------------------------------------------------------------------------------------
    # helpers

    def pick(self, values):
        return values[int(self.rng.integers(len(values)))]

    def raw(self, n: int | None = None) -> bytes:
        n = int(self.rng.choice([0, 1, 3, 8, 17, 64, 300, 4096])) if n is None else n
        return self.rng.bytes(n)

    def any_int(self, bits: int = 64) -> int:
        top = (1 << bits) - 1
        return int(self.pick([0, 1, 2, 3, 7, 255, 1 << 31, top - 1, top, int(self.rng.integers(0, 1 << 62))])) & top

    def any_float(self) -> float:
        return float(self.pick([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3e38, 1.0, 0.5, 1e9]))

    def ids(self, t: Target, n: int, *, owned: bool) -> np.ndarray:
        if owned:
            slots = self.rng.choice(t.owned, size=n)
            per_slot = t.num_rows // t.num_slots
            return (slots + t.num_slots * self.rng.integers(0, per_slot, size=n)).astype(np.int64)
        return self.rng.choice(
            np.array([-1, -(1 << 63), t.num_rows, t.num_rows + 5, (1 << 63) - 1, 0, 1, 2, 3]), size=n
        ).astype(np.int64)

    def mangle(self, data: bytes) -> bytes:
        b = bytearray(data)
        how = int(self.rng.integers(4))
        if how == 0 and b:
            for _ in range(int(self.rng.integers(1, 8))):
                b[int(self.rng.integers(len(b)))] ^= 1 << int(self.rng.integers(8))
        elif how == 1 and b:
            b = b[: int(self.rng.integers(len(b)))]
        elif how == 2:
            b += self.raw()
        else:
            b = bytearray(b"\x0a\xff\xff\xff\xff\x0f") + b  # a field claiming 4 GiB
        return bytes(b)

    # ---------------------------------------------------------------------------------------
    # well-formed but hostile messages, one builder per RPC

    def lookup(self, t: Target, epoch: int) -> shard_pb2.LookupRequest:
        kind = int(self.rng.integers(6))
        ids = self.ids(t, int(self.rng.integers(0, 40)), owned=kind != 0)
        row_ids = ids.tobytes()
        if kind == 1:
            row_ids = row_ids[:-3] if row_ids else b"\x01"
        if kind == 2:  # a reply larger than a message: refused before it is built
            row_ids = np.resize(self.ids(t, 64, owned=True), (2 << 20) // 8 // t.dim + 1000).tobytes()
        return shard_pb2.LookupRequest(
            table=self.pick([t.table, t.table, -1, I32, 0, t.table + 1]),
            epoch=self.pick([epoch, epoch, 0, epoch + 1, U64]),
            row_ids=row_ids,
            dtype=self.pick([1, 2, 3, 0, 4, I32]),
            request_id=self.pick(["", "x" * 1000, "\u2603"]),
            step=self.pick([0, 0, 1, U64, self.any_int()]),
            max_staleness=self.pick([0, U32, self.any_int(32)]),
        )

    def optimizer(self) -> shard_pb2.OptimizerParams:
        return shard_pb2.OptimizerParams(
            kind=self.pick(["adam", "", "adagrad", "sgd", "\x00", "a" * 500]),
            lr=self.any_float(),
            beta1=self.any_float(),
            beta2=self.any_float(),
            eps=self.any_float(),
            version=self.any_int(32),
        )

    def apply(self, t: Target, epoch: int, applied: int) -> shard_pb2.ApplyGradientsRequest:
        n = int(self.rng.integers(0, 20))
        ids = self.ids(t, n, owned=self.rng.random() < 0.7)
        if n > 2 and self.rng.random() < 0.3:
            ids[1] = ids[0]  # duplicates
        grads = self.rng.standard_normal((n, t.dim)).astype(np.float32)
        if n and self.rng.random() < 0.3:
            grads[0, 0] = self.pick([np.nan, np.inf, -np.inf])
        gbytes = grads.tobytes()
        if self.rng.random() < 0.2:
            gbytes = gbytes[: int(self.rng.integers(len(gbytes) + 1))]
        multi = self.rng.random() < 0.05
        return shard_pb2.ApplyGradientsRequest(
            table=self.pick([t.table, t.table, t.table, -7, I32]),
            epoch=self.pick([epoch, epoch, epoch, 0, U64]),
            row_ids=ids.tobytes(),
            grads=gbytes,
            step=self.pick([applied + 1, applied + 2, applied, 0, 1 << 63, U64, applied + 1000]),
            optimizer=self.optimizer() if self.rng.random() < 0.5 else valid_adam(self.rng),
            # multi-part steps never complete here: they hold max_step_parts parts, far more than sent
            part_id=self.pick(["", "w0", "w1", "x" * 300, "\u00e9"]) if multi else "",
            num_parts=self.pick([1024, 1024, 1025, U32]) if multi else self.pick([0, 1]),
            max_staleness=self.any_int(32),
        )

    def checkpoint(self, t: Target) -> shard_pb2.CheckpointRequest:
        name = self.pick(
            [
                "",
                "\x00bad",
                "/dev/null/x",
                "/proc/nope/x",
                f"{t.scratch}/{'y' * 300}",
                "../escape",
                f"{t.scratch}/../../escape",
                ".hidden",
                "a//b",
                "/" + "z" * 5000,
                f"{t.scratch}/ck{int(self.rng.integers(3))}",
            ]
        )
        return shard_pb2.CheckpointRequest(name=name, step=self.any_int())

    def restore(self, t: Target) -> shard_pb2.RestoreRequest:
        files = []
        for _ in range(int(self.rng.integers(0, 6))):
            files.append(
                shard_pb2.SlotFile(
                    table=self.pick([t.table, -1, I32]),
                    slot=self.pick([*t.owned[:3], -1, t.num_slots, I32]),
                    path=self.pick(
                        [
                            "etc/passwd",
                            "../../etc/passwd",
                            "/etc/passwd",
                            "",
                            "dev/zero",
                            "a\x00b",
                            "table1/slot00000.bin",
                            "x" * 5000,
                        ]
                    ),
                    sha256=self.pick(["", "00" * 32, "zz"]),
                    num_rows=self.any_int(),
                    num_bytes=self.any_int(),
                )
            )
        name = self.pick(
            [
                "/",
                "",
                "/nonexistent-engram",
                "\x00",
                "..",
                f"{t.scratch}/never-written",
                f"{t.scratch}/ck{int(self.rng.integers(3))}",
            ]
        )
        return shard_pb2.RestoreRequest(name=name, files=files)

    def migrate(self, t: Target, epoch: int) -> shard_pb2.MigrateSlotsRequest:
        slots = self.pick(
            [
                [],
                [-1],
                [t.num_slots],
                [I32],
                t.owned[:1] * 2,
                t.owned[:2],
                [int(s) for s in self.rng.integers(-5, t.num_slots + 5, size=4)],
            ]
        )
        target = self.pick(
            [
                t.peer,
                t.peer,
                t.address,
                "",
                "unix:/tmp/x",
                "127.0.0.1:0",
                f"127.0.0.1:{t.closed_port}",
                "a" * 300,
                "::::",
                "127.0.0.1:99999",
                "host with space:1",
            ]
        )
        return shard_pb2.MigrateSlotsRequest(slots=slots, target=target, epoch=self.pick([epoch, 0, epoch + 1, U64]))

    def chunks(self, t: Target, epoch: int) -> list[shard_pb2.SlotChunk]:
        foreign = [s for s in range(t.num_slots) if s not in t.owned] or [0]
        slot = self.pick([*foreign, *t.owned[:1], -1, I32])
        per_row = 4 * t.dim
        out = []
        for i in range(int(self.rng.integers(0, 4))):
            rows = int(self.rng.integers(0, 5))
            out.append(
                shard_pb2.SlotChunk(
                    table=self.pick([t.table, t.table, -1]),
                    slot=slot,
                    epoch=self.pick([epoch, epoch, 0, U64]),
                    weights=self.raw(rows * per_row + self.pick([0, 0, 1])),
                    state=self.raw(rows * 2 * per_row + self.pick([0, 0, 3])),
                    applied_step=self.any_int(),
                    last=bool(self.rng.random() < 0.4),
                    offset_rows=self.pick([0, 0, rows * i, U64]),
                )
            )
        return out

    def slot_map(self, t: Target, epoch: int) -> shard_pb2.SetSlotMapRequest:
        """Never a consistent new map: every one orphans, contradicts, jumps or repeats."""
        kind = int(self.rng.integers(6))
        owned = list(t.owned)
        if kind == 0:  # drops every slot, no owners named
            return shard_pb2.SetSlotMapRequest(epoch=epoch + 1, owned_slots=[])
        if kind == 1:  # an epoch far ahead
            return shard_pb2.SetSlotMapRequest(epoch=self.pick([U64, 1 << 63, epoch + 10_000]), owned_slots=owned)
        if kind == 2:  # owners that disagree with owned_slots, or of the wrong length / range
            owners = [int(x) for x in self.rng.integers(-3, 5, size=self.pick([t.num_slots, 3]))]
            return shard_pb2.SetSlotMapRequest(epoch=epoch + 1, owned_slots=owned[1:], owners=owners)
        if kind == 3:  # a new epoch the control plane never wrote (the shard keeps its slots)
            return shard_pb2.SetSlotMapRequest(epoch=epoch + 1, owned_slots=owned)
        if kind == 4:  # stale or same epoch with other slots
            return shard_pb2.SetSlotMapRequest(epoch=self.pick([0, epoch]), owned_slots=owned[:-1])
        bad = self.pick([[-1], [t.num_slots], owned[:1] * 2, [I32]])
        return shard_pb2.SetSlotMapRequest(epoch=epoch + 1, owned_slots=bad)

    # ---------------------------------------------------------------------------------------

    def case(self, t: Target, *, epoch: int, applied: int) -> Case:
        rpc = self.pick(RPCS)
        family = self.rng.random()
        if rpc == "Stats" or family < 0.25:  # raw random bytes
            payload: bytes | list[bytes] = (
                [self.raw() for _ in range(int(self.rng.integers(0, 4)))] if rpc in STREAMING else self.raw()
            )
            return Case(rpc, payload, "raw")
        if rpc == "Lookup":
            msgs = [self.lookup(t, epoch)]
        elif rpc == "ApplyGradients":
            msgs = [self.apply(t, epoch, applied)]
        elif rpc == "Checkpoint":
            msgs = [self.checkpoint(t)]
        elif rpc == "Restore":
            msgs = [self.restore(t)]
        elif rpc == "MigrateSlots":
            msgs = [self.migrate(t, epoch)]
        elif rpc == "ImportSlots":
            msgs = self.chunks(t, epoch)
        else:
            msgs = [self.slot_map(t, epoch)]
        data = [m.SerializeToString() for m in msgs]  # type: ignore[attr-defined]
        note = "hostile"
        if family < 0.45:
            data = [self.mangle(d) for d in data]
            note = "mangled"
        return Case(rpc, data if rpc in STREAMING else (data[0] if data else b""), note)


def valid_adam(rng: np.random.Generator) -> shard_pb2.OptimizerParams:
    """Legal but unusual Adam hyper-parameters."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return shard_pb2.OptimizerParams(
        kind=pick(["adam", ""]),
        lr=pick([1e-6, 0.05, 3.0]),
        beta1=pick([0.0, 0.9]),
        beta2=pick([0.0, 0.999, 0.999999]),
        eps=pick([1e-30, 1e-8, 1.0]),
        version=1,
    )


def valid_step(rng: np.random.Generator, t: Target, *, epoch: int, step: int) -> shard_pb2.ApplyGradientsRequest:
    """A well-formed single-part update of `step` on owned rows (may be empty; grads up to 1e15)."""
    n = int(rng.integers(0, 24))
    slots = rng.choice(t.owned, size=n)
    ids = np.unique(slots + t.num_slots * rng.integers(0, t.num_rows // t.num_slots, size=n)).astype(np.int64)
    scale = float(rng.choice([1e-6, 1.0, 1e15]))
    grads = (rng.standard_normal((ids.size, t.dim)) * scale).astype(np.float32)
    return shard_pb2.ApplyGradientsRequest(
        table=t.table,
        epoch=epoch,
        row_ids=ids.tobytes(),
        grads=grads.tobytes(),
        step=step,
        optimizer=valid_adam(rng),
        num_parts=int(rng.integers(0, 2)),
    )
