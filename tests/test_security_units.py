"""Pure pieces of issue 12b: checkpoint names, entry signatures, secret files, pickle-free loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from engram.torch_io import UnsafeCheckpoint, load_checkpoint_file
from services.control.security import Signer, Tampered, TamperLog, open_entry, read_secret, seal, write_secret
from services.shard import checkpoint as ckpt
from services.shard.errors import Code, ShardError


def test_checkpoint_names_stay_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert ckpt.checkpoint_dir(root, "run-1/step_000100") == root.resolve() / "run-1" / "step_000100"
    (root / "out").symlink_to(tmp_path, target_is_directory=True)
    (root / "in").symlink_to(root / "run-1", target_is_directory=True)
    assert ckpt.checkpoint_dir(root, "in/x") == root.resolve() / "in" / "x"  # a link that stays inside is fine
    for bad in (
        "",
        "..",
        "../x",
        "a/../../x",
        "/abs",
        "a//b",
        "a/",
        ".hidden",
        "a/.b",
        "a b",
        "a\\b",
        "x" * 256,
        "out",
        "out/x",
        "é",
    ):
        with pytest.raises(ShardError) as err:
            ckpt.checkpoint_dir(root, bad)
        assert err.value.code == Code.INVALID_ARGUMENT and err.value.message.startswith("name:"), bad


def test_signed_entries_detect_edits_forgeries_and_moves() -> None:
    signer = Signer(b"k" * 32)
    data = seal(signer, "ns:shards#0", b"body")
    assert open_entry(signer, "ns:shards#0", data) == b"body"
    assert open_entry(None, "ns:shards#0", data) == b"body"  # a reader without the key cannot check, takes it
    for where, bad in (
        ("ns:shards#1", data),  # moved to another shard id
        ("ns:shards#0", data[:-1] + b"B"),  # edited
        ("ns:shards#0", b"body"),  # unsigned
        ("ns:shards#0", seal(Signer(b"o" * 32), "ns:shards#0", b"body")),
    ):  # another key
        with pytest.raises(Tampered):
            open_entry(signer, where, bad)
    with pytest.raises(ValueError, match="at least 32"):
        Signer(b"short")
    log = TamperLog("redis://x")
    log.note("ns:slotmap", Tampered("x"), "ignored")
    log.note("ns:slotmap", Tampered("x"), "ignored")
    assert log.counts == {"ns:slotmap": 2} and log.total == 2


def test_secret_files(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "s" / "pw", b"hunter2\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and read_secret(str(path), "x") == b"hunter2"
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(ValueError, match="security.redis_password_file: .* is empty"):
        read_secret(str(tmp_path / "empty"), "security.redis_password_file")
    with pytest.raises(ValueError, match="cannot read"):
        read_secret(str(tmp_path / "missing"), "security.cluster_key_file")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # code that would run on a plain torch.load


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    from engram.checkpoint import load_model

    marker = tmp_path / "ran"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "model": {"w": torch.zeros(2)}, "config": {}, "hook": _Payload(marker)}, evil)
    for load in (load_checkpoint_file, load_model):
        with pytest.raises(UnsafeCheckpoint, match="refused, it holds pickled objects"):
            load(evil)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"step": 3, "model": {"w": torch.ones(2)}, "history": {"val_losses": [(1, 2.5)]}, "x": None}, plain)
    state = load_checkpoint_file(plain)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
