"""The pure math of a lookup: dedup, split by slot owner, chunk, reassemble.

No I/O here. A lookup of ids (any shape) becomes

    flat (N,) -> dedup -> unique (U,) [+ inverse (N,)] -> per shard: positions (n_s,) into unique
              -> per message: contiguous chunks of each shard's ids

and the rows come back as unique_rows (U, D) filled at `positions`, expanded by `inverse`.
When the ids hold no duplicates, `unique` keeps the request order and `inverse` is None
(the identity), so a one-shard, one-message lookup needs no reordering copy at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

FEW_SHARDS = 8  # maps of up to this many owners are split with a mask per shard (else a radix sort)


@dataclass(frozen=True, slots=True)
class Dedup:
    unique: np.ndarray  # (U,) int64; request order if inverse is None, else sorted
    inverse: np.ndarray | None  # (N,) int64 positions into unique, None = identity (U == N)
    shape: tuple[int, ...]  # shape of the request


@dataclass(frozen=True, slots=True)
class Group:
    """The unique ids one shard serves."""

    shard: int
    ids: np.ndarray  # (n,) int64
    positions: np.ndarray | None  # (n,) int64 indices into unique; None = all of unique, in order


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message's worth of a group: ids[start:stop] of that group."""

    shard: int
    ids: np.ndarray  # (m,) int64
    positions: np.ndarray | slice  # where these rows go in unique_rows


def as_id_array(row_ids: np.ndarray | torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """Any-shape integer ids (numpy or torch, any device) -> ((N,) int64 contiguous, shape)."""
    if isinstance(row_ids, torch.Tensor):
        if row_ids.dtype is torch.int64 and not row_ids.requires_grad and row_ids.device.type == "cpu":
            flat = row_ids.numpy().reshape(-1)  # the common case, in as few calls as possible
            if flat.flags.c_contiguous:
                return flat, tuple(row_ids.shape)
        if row_ids.is_floating_point() or row_ids.is_complex() or row_ids.dtype == torch.bool:
            raise ValueError(f"row_ids: expected an integer tensor, got {row_ids.dtype}")
        if row_ids.dtype != torch.int64 or row_ids.device.type != "cpu" or row_ids.requires_grad:
            row_ids = row_ids.detach().to(device="cpu", dtype=torch.int64)
        row_ids = row_ids.numpy()  # (each torch call costs microseconds: a small lookup's budget)
    arr = np.asarray(row_ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"row_ids: expected integers, got dtype {arr.dtype}")
    shape = tuple(arr.shape)
    flat = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    return flat, shape


def dedup(flat: np.ndarray, shape: tuple[int, ...]) -> Dedup:
    """(N,) ids -> unique ids and the inverse map (None when there is nothing to merge)."""
    if flat.size < 2:
        return Dedup(unique=flat, inverse=None, shape=shape)
    s = np.sort(flat)  # (N,) one O(N log N) pass to find out whether a second is needed
    if not np.any(s[1:] == s[:-1]):
        return Dedup(unique=flat, inverse=None, shape=shape)
    unique, inverse = np.unique(flat, return_inverse=True)
    return Dedup(unique=unique, inverse=inverse.reshape(-1).astype(np.int64, copy=False), shape=shape)


def check_range(flat: np.ndarray, num_rows: int, table: int) -> None:
    """(N,) int64 ids all in 0..num_rows-1, else ValueError naming the first that is not."""
    if flat.size and int(flat.astype(np.int64, copy=False).view(np.uint64).max()) >= num_rows:  # negative: >= 2**63
        bad = np.flatnonzero((flat < 0) | (flat >= num_rows))
        raise ValueError(
            f"row_ids: {bad.size} of {flat.size} ids are outside table {table}'s rows 0..{num_rows - 1} "
            f"(first: {int(flat[bad[0]])} at index {int(bad[0])})"
        )


def check_range_small(ids: list[int], flat: np.ndarray, *, num_rows: int, table: int) -> None:
    """`check_range` for a few ids already as python ints (`ids` = flat.tolist()): no numpy call."""
    if ids and (min(ids) < 0 or max(ids) >= num_rows):
        check_range(flat, num_rows, table)


def slot_of(ids: np.ndarray, num_slots: int) -> np.ndarray:
    """(n,) non-negative ids -> (n,) slots; a mask instead of a division for power-of-two slot counts."""
    if num_slots & (num_slots - 1) == 0:
        return ids & (num_slots - 1)
    return ids % num_slots


def sole_owner(owners: np.ndarray) -> int | None:
    """owners (num_slots,) -> the shard that owns every slot, or None."""
    return int(owners[0]) if owners.size and owners.min() == owners.max() else None


def owner_shards(owners: np.ndarray) -> tuple[int, ...]:
    """owners (num_slots,) -> the distinct shards that own slots, ascending."""
    return tuple(np.unique(owners).tolist())


def split_by_owner(
    unique: np.ndarray, owners: np.ndarray, *, sole: int | None = -1, shards: tuple[int, ...] = ()
) -> list[Group]:
    """unique (U,) ids, owners (num_slots,) shard per slot -> one Group per shard with ids.

    Inside a group, ids keep their order in `unique`. `sole`: the caller's `sole_owner(owners)`
    when it keeps it (-1: not known, worked out here); `shards`: its `owner_shards(owners)`,
    which lets a map of a few shards be split with one mask per shard instead of a sort.
    """
    if unique.size == 0:
        return []
    num_slots = owners.shape[0]
    if sole == -1:
        sole = sole_owner(owners)
    if sole is not None:  # one shard owns every slot: no per-id work
        return [Group(shard=sole, ids=unique, positions=None)]
    owner = owners[slot_of(unique, num_slots)]  # (U,) shard of each id
    if 0 < len(shards) <= FEW_SHARDS:  # a small lookup's cost is its numpy calls: ~2 per shard here
        groups = []
        for shard in shards:
            pos = np.flatnonzero(owner == shard)  # (n_s,) ascending: ids keep their order
            if pos.size == unique.size:
                return [Group(shard=shard, ids=unique, positions=None)]
            if pos.size:
                groups.append(Group(shard=shard, ids=unique[pos], positions=pos))
        return groups
    first = owner[0]
    if np.all(owner == first):
        return [Group(shard=int(first), ids=unique, positions=None)]
    # shard ids are small: a 16/32-bit key makes numpy's stable sort a radix sort, O(U)
    key = owner.astype(np.uint16 if owners.max() < 65536 else np.uint32)
    order = np.argsort(key, kind="stable")  # (U,) positions grouped by shard
    present, starts = np.unique(key[order], return_index=True)
    bounds = [*starts.tolist(), unique.size]
    groups = []
    for i, shard in enumerate(present.tolist()):
        pos = order[bounds[i] : bounds[i + 1]]
        groups.append(Group(shard=int(shard), ids=unique[pos], positions=pos.astype(np.int64, copy=False)))
    return groups


def max_rows_per_message(*, dim: int, itemsize: int, max_message_bytes: int, headroom: int = 64 << 10) -> int:
    """Rows that fit one request (8-byte ids) and one response (dim * itemsize per row)."""
    per_row = max(8, dim * itemsize)
    rows = (max_message_bytes - headroom) // per_row
    if rows < 1:
        raise ValueError(f"max message of {max_message_bytes} bytes cannot hold one {per_row}-byte row")
    return int(rows)


def chunk_groups(groups: list[Group], max_rows: int) -> list[Chunk]:
    """Split every group into messages of at most `max_rows` ids."""
    if max_rows < 1:
        raise ValueError(f"max_rows: must be >= 1, got {max_rows}")
    chunks = []
    for g in groups:
        n = g.ids.size
        pieces = max(1, -(-n // max_rows))
        step = -(-n // pieces)  # equal-sized pieces, none tiny
        for a in range(0, n, step):
            b = min(n, a + step)
            pos = slice(a, b) if g.positions is None else g.positions[a:b]
            chunks.append(Chunk(shard=g.shard, ids=g.ids[a:b], positions=pos))
    return chunks


def void_rows(t: torch.Tensor) -> np.ndarray:
    """(n, D) contiguous tensor -> (n,) numpy array of opaque D*itemsize-byte rows, same memory.

    numpy moves whole rows with one memcpy each; torch's index_copy_/index_select on bf16
    rows go element by element and are 3-8x slower on this path.
    """
    n = t.shape[0]
    raw = t.view(torch.uint8).numpy()  # (n, D * itemsize)
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(n)


def assemble(
    num_unique: int, dim: int, dtype: torch.dtype, *, parts: list[tuple[np.ndarray | slice, torch.Tensor]]
) -> torch.Tensor:
    """(positions, rows (m, D)) parts covering 0..U-1 exactly once -> unique_rows (U, D).

    A single part that covers everything in order is returned as is (no copy).
    """
    if len(parts) == 1:
        pos, rows = parts[0]
        if isinstance(pos, slice) and pos.start in (0, None) and rows.shape[0] == num_unique:
            return rows
    out = torch.empty((num_unique, dim), dtype=dtype)  # (U, D)
    if num_unique == 0:
        return out
    out_rows = void_rows(out)
    for pos, rows in parts:
        if isinstance(pos, slice):
            out[pos].copy_(rows)
        elif rows.shape[0]:
            np.put(out_rows, pos, void_rows(rows))
    return out


@functools.lru_cache(maxsize=64)
def _void(width: int) -> np.dtype:
    return np.dtype((np.void, width))


def new_rows(n: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """-> an uninitialised (n, D) tensor and (n,) numpy opaque rows on the same memory.

    numpy first, then one `frombuffer` and one view: each torch view costs microseconds, which
    is what a 1K-row lookup's own gather takes per ~100 rows.
    """
    rows = np.empty(n, dtype=_void(dim * dtype.itemsize))  # (n,)
    if not n:
        return torch.empty((0, dim), dtype=dtype), rows
    return torch.frombuffer(rows, dtype=dtype).view(n, dim), rows


def expand(unique_rows: torch.Tensor, d: Dedup) -> torch.Tensor:
    """unique_rows (U, D) -> rows in request order (*shape, D)."""
    dim = unique_rows.shape[1]
    if d.inverse is None:
        if len(d.shape) == 1 and unique_rows.shape[0] == d.shape[0]:
            return unique_rows  # (U, D) already: a view would cost as much as a hundred rows' copy
        return unique_rows.view(*d.shape, dim)
    if d.inverse.size == 0 or unique_rows.shape[0] == 0:
        return unique_rows.new_empty((*d.shape, dim))
    taken = np.take(void_rows(unique_rows.contiguous()), d.inverse)  # (N,) rows
    raw = torch.from_numpy(taken.view(np.uint8).reshape(d.inverse.size, -1))  # (N, D * itemsize)
    return raw.view(unique_rows.dtype).view(*d.shape, dim)
