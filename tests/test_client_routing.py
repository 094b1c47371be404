"""Pure parts of the shard client: dedup, routing by slot owner, chunking, reassembly, codecs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.layout import even_slot_map
from proto.shard.v1 import shard_pb2
from services.client.codec import DecodeError, decode_lookup_response, encode_lookup_request
from services.client.errors import RetryPolicy
from services.client.routing import (
    as_id_array,
    assemble,
    check_range,
    chunk_groups,
    dedup,
    expand,
    max_rows_per_message,
    split_by_owner,
)


def fake_rows(ids: np.ndarray, dim: int) -> torch.Tensor:
    """A row's value encodes its id, so any misplacement shows."""
    return torch.from_numpy(ids[:, None] * 1000.0 + np.arange(dim)[None, :]).float()  # (n, D)


def roundtrip(ids_any, owners: np.ndarray, max_rows: int, *, dim: int = 4) -> torch.Tensor:
    flat, shape = as_id_array(ids_any)
    d = dedup(flat, shape)
    chunks = chunk_groups(split_by_owner(d.unique, owners), max_rows)
    for c in chunks:  # each chunk only holds ids its shard owns
        assert np.all(owners[c.ids % owners.size] == c.shard)
    parts = [(c.positions, fake_rows(c.ids, dim)) for c in chunks]
    return expand(assemble(d.unique.size, dim, torch.float32, parts=parts), d)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("max_rows", [1, 7, 1000])
def test_roundtrip_matches_direct_gather(num_shards: int, max_rows: int) -> None:
    rng = np.random.default_rng(num_shards * 100 + max_rows)
    owners = np.asarray(even_slot_map(16, num_shards))
    ids = rng.integers(0, 500, size=(3, 5, 4))  # duplicates likely
    out = roundtrip(ids, owners, max_rows)
    assert out.shape == (3, 5, 4, 4)
    torch.testing.assert_close(out, fake_rows(ids.reshape(-1), 4).view(3, 5, 4, 4))


def test_unique_ids_keep_request_order_and_identity_inverse() -> None:
    ids = np.array([9, 3, 7, 1], dtype=np.int64)
    d = dedup(*as_id_array(ids))
    assert d.inverse is None and d.unique.tolist() == [9, 3, 7, 1]
    out = roundtrip(ids, np.zeros(4, dtype=np.int64), 100)
    torch.testing.assert_close(out, fake_rows(ids, 4))


def test_duplicates_are_merged_with_inverse() -> None:
    ids = np.array([[5, 5, 2], [2, 9, 5]])
    d = dedup(*as_id_array(ids))
    assert d.unique.tolist() == [2, 5, 9]
    assert d.unique[d.inverse].tolist() == ids.reshape(-1).tolist()


def test_single_message_single_shard_needs_no_copy() -> None:
    rows = torch.arange(12.0).view(3, 4)
    assert assemble(3, 4, torch.float32, parts=[(slice(0, 3), rows)]) is rows


def test_torch_and_numpy_inputs_agree() -> None:
    ids = torch.tensor([[4, 1], [1, 8]], dtype=torch.int32)
    flat, shape = as_id_array(ids)
    assert flat.dtype == np.int64 and shape == (2, 2) and flat.tolist() == [4, 1, 1, 8]
    with pytest.raises(ValueError, match="integer"):
        as_id_array(torch.zeros(3))
    with pytest.raises(ValueError, match="integers"):
        as_id_array(np.zeros(3))


def test_empty_lookup() -> None:
    out = roundtrip(np.zeros((2, 0), dtype=np.int64), np.zeros(4, dtype=np.int64), 10)
    assert out.shape == (2, 0, 4)


def test_routing_groups_by_slot_owner() -> None:
    owners = np.array([0, 1, 1, 0])  # slot = row % 4
    groups = split_by_owner(np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int64), owners)
    by_shard = {g.shard: g.ids.tolist() for g in groups}
    assert by_shard == {0: [0, 3, 4, 7], 1: [1, 2, 5, 6]}


def test_chunks_respect_the_limit_and_cover_everything() -> None:
    owners = np.array([0, 1])
    ids = np.arange(1001, dtype=np.int64)
    chunks = chunk_groups(split_by_owner(ids, owners), 100)
    assert all(c.ids.size <= 100 for c in chunks)
    assert sorted(np.concatenate([c.ids for c in chunks]).tolist()) == ids.tolist()
    assert len(chunks) == 6 + 5  # 501 ids of shard 0 in 6 balanced messages, 500 of shard 1 in 5


def test_message_limit_in_rows() -> None:
    # bf16 rows of 64 dims are 128 bytes; 1 MiB minus the 64 KiB headroom
    assert max_rows_per_message(dim=64, itemsize=2, max_message_bytes=1 << 20) == ((1 << 20) - (64 << 10)) // 128
    # tiny rows: the 8-byte ids of the request are the bigger side
    assert max_rows_per_message(dim=2, itemsize=2, max_message_bytes=1 << 20) == ((1 << 20) - (64 << 10)) // 8
    with pytest.raises(ValueError, match="cannot hold"):
        max_rows_per_message(dim=512, itemsize=4, max_message_bytes=1000, headroom=0)


def test_out_of_range_ids_are_named() -> None:
    check_range(np.array([0, 9]), 10, 1)
    with pytest.raises(ValueError, match=r"2 of 3 ids are outside table 1's rows 0..9 \(first: -1 at index 0\)"):
        check_range(np.array([-1, 3, 10]), 10, 1)
    for bad in (np.array([3, -(2**63)], dtype=np.int64), np.array([3, -5], dtype=np.int32), np.array([2**40, 1])):
        with pytest.raises(ValueError, match="1 of 2 ids are outside"):  # one unsigned pass catches both ends
            check_range(bad, 10, 1)
    check_range(np.array([0, 9], dtype=np.int32), 10, 1)


def test_a_known_sole_owner_skips_the_split() -> None:
    ids = np.array([5, 1, 7], dtype=np.int64)
    owners = np.zeros(8, dtype=np.int64)
    (g,) = split_by_owner(ids, owners, sole=0)
    assert g.shard == 0 and g.positions is None and g.ids is ids
    owners[3] = 1  # two owners: `sole=None` from the caller means "split"
    groups = split_by_owner(ids, owners, sole=None)
    assert [g.shard for g in groups] == [0] and groups[0].positions is None  # no id in slot 3
    groups = split_by_owner(np.array([3, 5], dtype=np.int64), owners)
    assert sorted(g.shard for g in groups) == [0, 1]


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_codecs_match_protobuf(n: int) -> None:
    ids = np.arange(n, dtype="<i8") * 7919
    ours = encode_lookup_request(table=15, epoch=2**40 + 3, row_ids=ids, dtype=shard_pb2.BF16, request_id="r1")
    ref = shard_pb2.LookupRequest(
        table=15, epoch=2**40 + 3, row_ids=ids.tobytes(), dtype=shard_pb2.BF16, request_id="r1"
    )
    assert ours == ref.SerializeToString()
    ours = encode_lookup_request(table=1, epoch=2, row_ids=ids, dtype=shard_pb2.FP32, step=2**33 + 1, max_staleness=3)
    ref = shard_pb2.LookupRequest(
        table=1, epoch=2, row_ids=ids.tobytes(), dtype=shard_pb2.FP32, step=2**33 + 1, max_staleness=3
    )
    assert ours == ref.SerializeToString()
    msg = shard_pb2.LookupResponse(rows=ids.tobytes(), dim=64, dtype=shard_pb2.FP16, epoch=9, applied_step=4)
    reply = decode_lookup_response(msg.SerializeToString())
    assert bytes(reply.rows) == ids.tobytes()
    assert (reply.dim, reply.dtype, reply.epoch, reply.applied_step) == (64, shard_pb2.FP16, 9, 4)


def test_decoder_skips_unknown_fields_and_rejects_truncation() -> None:
    data = shard_pb2.LookupResponse(rows=b"abcd", dim=2).SerializeToString()
    unknown = bytes([0x30 | 0, 5, (7 << 3) | 2, 2, 0, 0, (8 << 3) | 5, 1, 2, 3, 4])  # fields 6, 7, 8
    reply = decode_lookup_response(data + unknown)
    assert bytes(reply.rows) == b"abcd" and reply.dim == 2
    with pytest.raises(DecodeError):
        decode_lookup_response(data[:-3])


def test_backoff_grows_with_jitter_and_caps() -> None:
    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)]:
        delays = [p.backoff(attempt) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1
