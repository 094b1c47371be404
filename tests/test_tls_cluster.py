"""TLS, mTLS and roles against real processes: a LocalCluster with throwaway certificates (as `engram up`).

Every RPC without a role is refused, each role is refused outside its rights (the message names
the role needed), a certificate from another CA or an expired one is refused on gRPC and on the
data plane, the right identities look up (gRPC and TLS data plane), push and checkpoint, and a
rotated certificate is served without a restart.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time

import grpc
import numpy as np
import pytest
import torch

from engram.config import SecurityConfig
from services.client import ShardClient, ShardError
from services.client.dataplane import DataPlaneClient, DataPlaneDown
from services.client.row_request import RowRequest
from services.errors import Reason, error_reason
from services.launcher import LocalCluster
from services.security import certs
from services.security.tls import sync_channel
from tests.fixtures_procs import expected_rows, run

OPT = {"kind": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "version": 1}
SHARD = "/engram.shard.v1.MemoryShard/"
UNARY = ["Lookup", "ApplyGradients", "Checkpoint", "Restore", "MigrateSlots", "SetSlotMap", "Stats"]
STREAMING = {"ImportSlots": "stream_unary"}
ALL = [*UNARY, *STREAMING, "HealthCheck"]
NEEDS = {
    "Lookup": "read",
    "Stats": "read",
    "HealthCheck": "read",
    "ApplyGradients": "train",
    "Checkpoint": "train",
    "Restore": "train",
    "MigrateSlots": "admin",
    "ImportSlots": "admin",
    "SetSlotMap": "admin",
}
RANK = {"read": 0, "train": 1, "admin": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    ck = tmp_path_factory.mktemp("ck")
    with LocalCluster(
        preset="tiny",
        num_shards=2,
        log_dir=tmp_path_factory.mktemp("logs"),
        startup_timeout_s=90,
        overrides=["cluster.row_path=tcp", f"cluster.checkpoint_dir={ck}"],
        tls=True,
    ) as c:
        c.checkpoint_root = ck
        yield c


@pytest.fixture(scope="module")
def extra(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SecurityConfig]:
    """Identities the cluster did not hand out: no role, another CA's admin, an expired admin."""
    out = tmp_path_factory.mktemp("extra")
    ca_dir = cluster.certs["admin"].ca.parent
    ca_key, ca_cert = certs.load_ca(ca_dir)
    other_key, other_cert = certs.make_ca(common_name="not the cluster's CA")
    made = {
        "norole": certs.issue(ca_key, ca_cert, name="nobody", role=None),
        "forged": certs.issue(other_key, other_cert, name="forger", role="admin"),
        "expired": certs.issue(
            ca_key,
            ca_cert,
            name="late",
            role="admin",
            days=1,
            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        ),
    }
    secs = {}
    for name, (key, cert) in made.items():
        c, k = certs.write_pair(out, name, key=key, cert=cert)
        secs[name] = SecurityConfig(
            tls_enabled=True, tls_cert=str(c), tls_key=str(k), tls_ca=str(cluster.certs["admin"].ca), auth_enabled=True
        )
    return secs


def _call(address: str, sec: SecurityConfig, name: str) -> grpc.StatusCode:
    """One call of `name` with an empty request -> its status code (OK counts as OK)."""
    with sync_channel(address, sec) as ch:
        try:
            if name == "HealthCheck":
                ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
            elif name in STREAMING:
                call = getattr(ch, STREAMING[name])(SHARD + name)
                call(iter([b""]), timeout=10)
            else:
                ch.unary_unary(SHARD + name)(b"", timeout=10)
        except grpc.RpcError as exc:
            _call.details = exc.details() or ""  # type: ignore[attr-defined]
            return exc.code()
    return grpc.StatusCode.OK


def test_no_role_is_refused_on_every_rpc(cluster: LocalCluster, extra: dict[str, SecurityConfig]) -> None:
    address = cluster.addresses[0]
    for name in ALL:
        assert _call(address, extra["norole"], name) == grpc.StatusCode.UNAUTHENTICATED, name
        assert f"'{NEEDS[name]}' role" in _call.details, (name, _call.details)  # type: ignore[attr-defined]
    # no client certificate at all: the mTLS handshake itself fails
    ca_only = SecurityConfig(tls_enabled=True, tls_ca=str(cluster.certs["admin"].ca))
    assert _call(address, ca_only, "Stats") == grpc.StatusCode.UNAVAILABLE
    # plaintext to a TLS port: no answer either
    assert _call(address, SecurityConfig(), "HealthCheck") == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", ["read", "train"])
def test_each_role_is_refused_outside_its_rights(cluster: LocalCluster, role: str) -> None:
    sec = cluster.security(role)
    for name, need in NEEDS.items():
        if RANK[need] > RANK[role]:
            assert _call(cluster.addresses[1], sec, name) == grpc.StatusCode.PERMISSION_DENIED, name
            details = _call.details  # type: ignore[attr-defined]
            assert f"needs the '{need}' role; this caller has '{role}'" in details, details
    for name in ("Lookup", "Stats", "HealthCheck"):  # allowed: empty requests get past the interceptor
        assert _call(cluster.addresses[1], sec, name) not in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        ), name


def test_forged_and_expired_certificates_are_refused(cluster: LocalCluster, extra: dict[str, SecurityConfig]) -> None:
    for bad in ("forged", "expired"):
        assert _call(cluster.addresses[0], extra[bad], "Stats") == grpc.StatusCode.UNAVAILABLE, bad
        data = _data_address(cluster, 0)

        async def probe(sec: SecurityConfig = extra[bad], data: str = data) -> None:
            client = DataPlaneClient(data, ssl_context=_client_ssl(sec))
            try:
                await client.lookup(RowRequest(1, np.arange(4), 2, 8, 1))
            finally:
                client.close()

        with pytest.raises((DataPlaneDown, ShardError)):
            run(probe())


def _client_ssl(sec: SecurityConfig) -> ssl.SSLContext:
    from services.security.tls import client_ssl

    ctx = client_ssl(sec)
    assert ctx is not None
    return ctx


def _data_address(cluster: LocalCluster, shard_id: int) -> str:
    async def get() -> str:
        cp = cluster.control()
        try:
            return next(r.info["row_paths"]["data_address"] for r in await cp.shards() if r.shard_id == shard_id)
        finally:
            await cp.close()

    return run(get())


def test_data_plane_needs_the_read_role(cluster: LocalCluster, extra: dict[str, SecurityConfig]) -> None:
    data = _data_address(cluster, 0)

    async def probe() -> None:
        client = DataPlaneClient(data, ssl_context=_client_ssl(extra["norole"]))
        try:
            await client.lookup(RowRequest(1, np.arange(4), 2, 8, 1))
        finally:
            client.close()

    with pytest.raises(ShardError) as err:
        run(probe())
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'read' role" in err.value.message
    assert error_reason(err.value) == Reason.PERMISSION_DENIED  # the frame carries the reason gRPC's would


def test_roles_look_up_push_and_checkpoint(cluster: LocalCluster) -> None:
    ids = np.random.default_rng(0).integers(0, 1900, size=(2, 40))
    want = expected_rows(cluster.cfg, 1, ids, dtype=torch.float32)

    async def go() -> None:
        reader = await ShardClient.connect(cluster.control(), wire_dtype="fp32", security=cluster.security("read"))
        trainer = await ShardClient.connect(
            cluster.control(), wire_dtype="fp32", security=cluster.security("train"), row_path="grpc"
        )
        try:
            rows = await reader.lookup(1, ids)  # over the TLS data plane (cluster.row_path=tcp)
            assert torch.equal(rows, want)
            assert reader.row_paths.used["tcp"] >= 2 and reader.row_paths.used["grpc"] == 0, reader.row_paths.used
            uniq = np.unique(ids)
            with pytest.raises(ShardError) as err:  # read may not push
                await reader.apply_gradients(1, uniq, torch.ones(uniq.size, want.shape[-1]), step=1, optimizer=OPT)
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            await trainer.apply_gradients(1, uniq, torch.ones(uniq.size, want.shape[-1]), step=1, optimizer=OPT)
            after = await trainer.lookup(1, ids)
            assert not torch.equal(after, want)  # the push changed the rows
            where = cluster.checkpoint_root / "tls-step1"  # a name under the shards' checkpoint root
            manifest = await trainer.checkpoint("tls-step1", 1)
            assert manifest["files"] and all((where / f["path"]).is_file() for f in manifest["files"])
            with pytest.raises(ShardError) as err:  # a worker may not roll the tables back
                await reader.restore(manifest)
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'train' role" in err.value.message
            assert (await trainer.restore(manifest))["step"] == 1  # the trainer's --resume
            assert torch.equal(await trainer.lookup(1, ids), after)
        finally:
            for c in (reader, trainer):
                await c.close()
                await c.control.close()

    run(go(), timeout_s=120)


def _served_cn(address: str, sec: SecurityConfig) -> str:
    """The common name of the certificate a TLS server presents to a new connection."""
    host, _, port = address.rpartition(":")
    ctx = _client_ssl(sec)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        cert = s.getpeercert()
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


def test_rotated_certificate_is_served_without_restart(cluster: LocalCluster) -> None:
    """Last in this module: it replaces the shard certificate files every shard reads."""
    admin = cluster.security("admin")
    address, data = cluster.addresses[0], _data_address(cluster, 0)
    assert _served_cn(address, admin) == "engram-shard"
    assert _served_cn(data, admin) == "engram-shard"
    pid = cluster.shards[0].pid
    ca_key, ca_cert = certs.load_ca(cluster.certs["shard"].ca.parent)
    key, cert = certs.issue(ca_key, ca_cert, name="engram-shard-rotated", role="admin", hosts=[cluster.host])
    time.sleep(0.01)  # a new mtime
    certs.write_pair(cluster.certs["shard"].cert.parent, "shard", key=key, cert=cert)
    assert _served_cn(address, admin) == "engram-shard-rotated"  # gRPC: the next connection
    assert _served_cn(data, admin) == "engram-shard-rotated"  # data plane: the next accept
    assert cluster.shards[0].pid == pid and cluster.shards[0].proc.poll() is None
    assert (
        _call(address, admin, "Stats") == grpc.StatusCode.INVALID_ARGUMENT
        or _call(address, admin, "Stats") == grpc.StatusCode.OK
    )  # and it still serves calls


def test_worker_serves_mtls_with_roles(cluster: LocalCluster, extra: dict[str, SecurityConfig]) -> None:
    """`engram serve` with the read identity: Score needs a role; `engram health` checks it over mTLS."""
    import subprocess
    import sys

    from proto.worker.v1 import worker_pb2, worker_pb2_grpc
    from tests.worker_proc import WorkerProcess, shared_tiny_checkpoint

    read = cluster.certs["read"]
    sets = [
        "security.tls_enabled=true",
        "security.auth_enabled=true",
        f"security.tls_ca={read.ca}",
        f"security.tls_cert={read.cert}",
        f"security.tls_key={read.key}",
    ]
    worker = WorkerProcess(shared_tiny_checkpoint(), *[a for s in sets for a in ("--set", s)]).start()
    try:
        with sync_channel(worker.address, cluster.security("read")) as ch:
            reply = worker_pb2_grpc.ModelWorkerStub(ch).Score(worker_pb2.ScoreRequest(text="def f(x):"), timeout=30)
            assert reply.num_tokens > 0
        with sync_channel(worker.address, extra["norole"]) as ch, pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.ModelWorkerStub(ch).Score(worker_pb2.ScoreRequest(text="def f(x):"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = [sys.executable, "-m", "engram_cli.main", "health", "--address", worker.address]
        ok = subprocess.run(
            [*health, *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=60
        )
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        plain = subprocess.run(health, capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stdout + plain.stderr
    finally:
        worker.kill()
