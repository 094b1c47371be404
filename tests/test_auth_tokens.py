"""Bearer-token roles without TLS (a trusted network) and the bind rules, against real shard processes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from engram.config import ConfigError, SecurityConfig, load_config
from services.client import ShardClient, ShardError
from services.security.tls import check_bind, sync_channel
from tests.fixtures_cluster import ShardProcess, run_shard_to_exit, shard_procs  # noqa: F401
from tests.fixtures_procs import run

OPT = {"kind": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "version": 1}
TOKENS = {"read": "r" * 24, "train": "t" * 24, "admin": "a" * 24}
BASE = ["--preset", "tiny", "--standalone", "--shard-id", "0", "--port", "0", "--set", "cluster.num_shards=1"]


def _token_file(tmp: Path, role: str, token: str | None = None) -> str:
    p = tmp / f"{role}.token"
    p.write_text((token or TOKENS[role]) + "\n")
    return str(p)


def _code(address: str, sec: SecurityConfig, method: str) -> tuple[grpc.StatusCode, str]:
    with sync_channel(address, sec) as ch:
        try:
            ch.unary_unary(method)(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_tokens_give_roles_and_rotate(tmp_path: Path, shard_procs: list) -> None:  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{role} {tok}\n" for role, tok in TOKENS.items()) + "# a comment\n")
    shard = ShardProcess(  # bearer tokens over plaintext: the trusted-network case, no TLS
        [*BASE, "--set", "security.auth_enabled=true", "--set", f"security.tokens_file={tokens}"], tls=False
    )
    shard_procs.append(shard)
    shard.start()
    lookup = "/engram.shard.v1.MemoryShard/Lookup"
    code, msg = _code(shard.address, SecurityConfig(), lookup)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "'read' role" in msg and "no bearer token" in msg, msg
    code, msg = _code(shard.address, SecurityConfig(token_file=_token_file(tmp_path, "x", "z" * 20)), lookup)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not known" in msg, msg
    code, msg = _code(
        shard.address,
        SecurityConfig(token_file=_token_file(tmp_path, "read")),
        "/engram.shard.v1.MemoryShard/SetSlotMap",
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin' role; this caller has 'read'" in msg, msg

    cfg = load_config("tiny", None, ["cluster.num_shards=1"])
    ids = np.arange(64)

    async def go() -> None:
        reader = ShardClient.standalone(
            cfg,
            [shard.address],
            row_path="grpc",
            wire_dtype="fp32",
            security=SecurityConfig(token_file=_token_file(tmp_path, "read")),
        )
        trainer = ShardClient.standalone(
            cfg,
            [shard.address],
            row_path="grpc",
            wire_dtype="fp32",
            security=SecurityConfig(token_file=_token_file(tmp_path, "train")),
        )
        try:
            before = await reader.lookup(1, ids)
            grads = torch.ones(ids.size, before.shape[-1])
            with pytest.raises(ShardError) as err:
                await reader.apply_gradients(1, ids, grads, step=1, optimizer=OPT)
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            await trainer.apply_gradients(1, ids, grads, step=1, optimizer=OPT)
            assert not torch.equal(await reader.lookup(1, ids), before)
        finally:
            await reader.close()
            await trainer.close()

    run(go())
    # rotation: the file is re-read (at most once a second) without a restart
    new_read = "n" * 24
    time.sleep(1.1)
    tokens.write_text(f"read {new_read}\n")
    time.sleep(1.1)
    assert (
        _code(shard.address, SecurityConfig(token_file=_token_file(tmp_path, "read")), lookup)[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )
    code, _ = _code(shard.address, SecurityConfig(token_file=_token_file(tmp_path, "new", new_read)), lookup)
    assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert shard.proc.poll() is None


def test_plaintext_on_a_public_address_is_refused(tmp_path: Path) -> None:
    out = run_shard_to_exit([*BASE, "--host", "0.0.0.0"])
    assert out.returncode == 2 and "without TLS; refusing" in out.stderr, out.stderr
    out = run_shard_to_exit(
        [
            *BASE,
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--set",
            "cluster.host=0.0.0.0",
            "--set",
            "security.tls_enabled=true",
        ]
    )
    assert out.returncode == 2 and "security.tls_cert: required" in out.stderr, out.stderr


def test_bind_rule_and_override(caplog: pytest.LogCaptureFixture) -> None:
    check_bind("127.0.0.1", SecurityConfig(), what="x")
    check_bind("::1", SecurityConfig(), what="x")
    with pytest.raises(ConfigError, match="refusing"):
        check_bind("0.0.0.0", SecurityConfig(), what="metrics")
    with pytest.raises(ConfigError, match="refusing"):
        check_bind("10.1.2.3", SecurityConfig(), what="metrics")
    with caplog.at_level(logging.WARNING, logger="engram.security"):
        check_bind("0.0.0.0", SecurityConfig(allow_plaintext_public=True), what="metrics")
    assert "PLAINTEXT" in caplog.text
    check_bind("0.0.0.0", SecurityConfig(tls_enabled=True, tls_cert="c", tls_key="k", tls_ca="a"), what="x")


def test_security_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="security.tls_cert"):
        load_config("tiny", None, ["security.tls_enabled=true"])
    with pytest.raises(ConfigError, match="security.tokens_file"):
        load_config("tiny", None, ["security.auth_enabled=true"])
    with pytest.raises(ConfigError, match="tls_key"):
        load_config("tiny", None, ["security.tls_cert=/x.pem"])
