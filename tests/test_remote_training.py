"""Ray training with the tables on real shard processes, against single-process local training.

One Ray instance (2 CPUs) for the module; each test starts its own LocalCluster (real
redis-server + shard processes) and stops it. Tiny preset, fp32 rows on the wire.

The reference for sync mode with W workers is local training with W-way gradient
accumulation (train.grad_accum=W: the same slices, each loss / W), not the whole batch in one
step: that is a different float computation, which the signed-sqrt gate amplifies for some
seeds (tests/test_ray_split_batch.py). benchmarks/sync_equivalence.py runs the same
comparison over >= 200 steps of the cpu preset.

The optimizer's hyper-parameters travel as doubles (OptimizerParams): as fp32 they rounded
beta1/beta2/eps/lr differently from the local optimizer's Python floats, which made the two
runs part after ~12 steps with the default seed (4.8e-4 in loss by step 17). With doubles the
sync run equals the accumulation reference to 1e-6 with the default seed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from engram.checkpoint import load_model
from engram.config import load_config
from engram.data import prepare_data
from services.client import ShardError
from services.client.sync import SyncShardClient
from services.launcher import LocalCluster
from tests.corpus import write_code_corpus
from tests.faults import ExitAfter
from tests.fixtures_procs import secure_cluster
from trainer.local import train_local

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ray_session():
    from trainer.ray_trainer import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    write_code_corpus(root / "corpus.txt")
    return root


def overrides(root, name: str, *extra: str) -> list[str]:
    return [
        f'train.corpus=["{root / "corpus.txt"}"]',
        f"tokenizer.cache_dir={root / 'cache'}",
        f"train.out_dir={root / name}",
        f"cluster.checkpoint_dir={root / name / 'shards'}",
        "train.progress=false",
        "cluster.wire_dtype=fp32",
        *extra,
    ]


def start_cluster(root, name: str, *extra: str, num_shards: int = 2) -> tuple[LocalCluster, list[str]]:
    ov = overrides(root, name, *extra)
    cluster = secure_cluster(
        ov, num_shards=num_shards, log_dir=root / f"{name}-logs", shard_args=["--threads", "2"], startup_timeout_s=120
    ).start()
    return cluster, ov + cluster.cluster_overrides + cluster.client_overrides("train")  # the trainer's identity


@pytest.fixture(scope="module")
def reference(workdir):
    """Single-process training with local tables: the result sync mode must equal."""
    cfg = load_config("tiny", None, overrides(workdir, "local", "train.grad_accum=2"))
    data = prepare_data(cfg)
    result = train_local(cfg, data=data)
    model, _, _ = load_model(result.checkpoint)
    return cfg, data, result, model


def pull_tables(cfg) -> dict[int, torch.Tensor]:
    with SyncShardClient.connect(cfg) as rows:
        return {t: rows.pull_table(t) for t in cfg.engram.layer_ids}


def latest_manifest(cfg) -> dict | None:
    from services.control.store import ControlPlane

    async def read():
        cp = ControlPlane.from_config(cfg)  # the cluster's password and key
        try:
            return await cp.latest_manifest()
        finally:
            await cp.close()

    return asyncio.run(read())


def test_sync_two_workers_two_shards_equals_local_training(ray_session, workdir, reference) -> None:
    from trainer.ray_trainer import train_ray

    _, data, local, local_model = reference
    cluster, ov = start_cluster(workdir, "sync", "train.checkpoint_every=10")
    try:
        cfg = load_config("tiny", None, ov)
        result = train_ray(cfg, data=data)
        assert len(result.train_losses) == cfg.train.steps == 20
        np.testing.assert_allclose(result.train_losses, local.train_losses, rtol=1e-6, atol=0)
        assert [s for s, _ in result.val_losses] == [10, 20]
        np.testing.assert_allclose([v for _, v in result.val_losses], [v for _, v in local.val_losses], rtol=1e-6)
        assert result.staleness["max"] == 0 and result.staleness["steps"] == 20
        shard_tables = pull_tables(cfg)
        for layer, rows in shard_tables.items():
            local_rows = local_model.tables[str(layer)].weight.detach()  # (R, dh)
            touched = (local_rows != load_model_init(cfg, layer)).any(dim=1)
            assert int(touched.sum()) > 100  # the comparison covers many trained rows
            torch.testing.assert_close(rows, local_rows, rtol=0, atol=1e-6)
        manifest = latest_manifest(cfg)
        assert manifest is not None and manifest["step"] == 20 and len(manifest["files"]) == 16
        exported, _, _ = load_model(result.checkpoint)  # dense + tables pulled back: a normal local checkpoint
        for name, p in local_model.state_dict().items():
            torch.testing.assert_close(exported.state_dict()[name], p, rtol=0, atol=1e-4, msg=name)
        assert (workdir / "sync" / "loss.png").stat().st_size > 1000
    finally:
        cluster.stop()


def load_model_init(cfg, layer: int) -> torch.Tensor:
    """(R, dh) initial rows of `layer`, as both the shards and the local model start."""
    from engram.init import init_rows
    from engram.layout import table_layouts

    lay = table_layouts(cfg.engram)[layer]
    rows = init_rows(
        seed=cfg.engram.seed, layer_id=layer, rows=np.arange(lay.num_rows), dim=lay.dim, std=cfg.engram.init_std
    )
    return torch.from_numpy(rows)


def test_crash_then_resume_on_other_worker_and_shard_counts(ray_session, workdir, reference) -> None:
    """The trainer dies after step 13 (checkpoint at 10); resume onto 1 worker and 1 shard."""
    from trainer.ray_trainer import checkpoint_dirs, train_ray

    _, data, local, _ = reference
    cluster, ov = start_cluster(workdir, "crash", "train.checkpoint_every=10")
    try:
        cfg = load_config("tiny", None, ov)
        with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death in its own error types
            train_ray(cfg, data=data, on_step=ExitAfter(13))
        assert [d.name for d in checkpoint_dirs(cfg)] == ["step_000010"]
        with SyncShardClient.connect(cfg) as rows:
            assert min(rows.applied_steps().values()) == 13  # the shards went past the checkpoint
    finally:
        cluster.stop()
    # a new cluster with one shard (slot files restore onto any shard count), and one worker
    cluster, ov = start_cluster(workdir, "crash", "train.checkpoint_every=10", "dist.num_workers=1", num_shards=1)
    try:
        cfg = load_config("tiny", None, ov)
        resumed = train_ray(cfg, data=data, resume=True)
        assert resumed.resumed_from == 10
    finally:
        cluster.stop()
    # its local reference: 2-way accumulation for steps 1-10 (2 workers), whole batches after (1 worker)
    ref_ov = overrides(workdir, "crash-local", "train.checkpoint_every=10")
    train_local(load_config("tiny", None, [*ref_ov, "train.grad_accum=2"]), data=data, stop_at=10)
    ref = train_local(load_config("tiny", None, ref_ov), data=data, resume=True)
    np.testing.assert_allclose(resumed.train_losses[:10], local.train_losses[:10], rtol=1e-4)
    np.testing.assert_allclose(resumed.train_losses, ref.train_losses, rtol=1e-4)
    assert resumed.final_val_loss == pytest.approx(ref.final_val_loss, rel=1e-4)


def test_async_staleness_is_bounded_and_training_converges(ray_session, workdir, reference) -> None:
    from trainer.ray_trainer import train_ray

    _, data, _, _ = reference
    # two Engram layers: pushes of several tables per step, in order, on the background thread
    # TCP rows: the shards count the staleness they serve (shared-memory reads never reach them)
    cluster, ov = start_cluster(
        workdir,
        "async",
        "dist.mode=async",
        "dist.staleness=1",
        "train.steps=20",
        "model.n_layer=3",
        "engram.layer_ids=[1,2]",
        "cluster.row_path=tcp",
    )
    try:
        cfg = load_config("tiny", None, ov)
        result = train_ray(cfg, data=data)
        st = result.staleness
        assert st["steps"] == 20 and 0 <= st["max"] <= 1, st
        assert sum(st["histogram"].values()) == 20
        # the shards checked the bound themselves and report what they served
        with SyncShardClient.connect(cfg) as rows:
            seen = [st.max_staleness_seen for st in rows.stats().values()]
        assert len(seen) == 2 and max(seen) <= 1, seen
        assert max(seen) == st["max"], (seen, st)
        losses = result.train_losses
        assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
        assert result.final_val_loss < losses[0] - 0.5
        assert set(pull_tables(cfg)) == {1, 2}
    finally:
        cluster.stop()


def test_bad_gradients_are_refused_through_the_push_path(workdir) -> None:
    from trainer.remote_step import Prefetch, RemoteStep, StaleRowsError

    cluster, ov = start_cluster(workdir, "bad")
    try:
        cfg = load_config("tiny", None, ov)
        layer = cfg.engram.layer_ids[0]
        rows = SyncShardClient.connect(cfg)
        before = pull_tables(cfg)
        ids = np.array([1, 5, 17, 40])
        dim = before[layer].shape[1]
        hyper = {"kind": "adam", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "version": 1}
        ok = torch.ones(4, dim)
        for grads, words in [(torch.full((4, dim), float("nan")), "NaN/Inf"), (torch.ones(4, dim + 1), "grads: shape")]:
            with pytest.raises(ValueError, match=words):  # refused by the client before anything is sent
                rows.push(layer, ids, grads, step=1, optimizer=hyper, part_id="0", num_parts=1).result()
        assert rows.applied_steps() == {layer: 0}
        torch.testing.assert_close(pull_tables(cfg)[layer], before[layer], rtol=0, atol=0)
        rows.push(layer, ids, ok, step=1, optimizer=hyper, part_id="0", num_parts=1).result()
        after_one = pull_tables(cfg)[layer]
        with pytest.raises(ShardError, match="from the past") as err:
            rows.push(layer, ids, ok, step=1, optimizer=hyper, part_id="0", num_parts=1).result()
        assert err.value.code.name == "FAILED_PRECONDITION"
        torch.testing.assert_close(pull_tables(cfg)[layer], after_one, rtol=0, atol=0)
        assert rows.applied_steps() == {layer: 1}
        # a trainer that dies mid-step leaves a half-collected step; resume still restores
        manifest = rows.checkpoint("bad/ckpt1", 1)
        assert rows.push(layer, ids, ok, step=2, optimizer=hyper, part_id="0", num_parts=2).result().pending
        with pytest.raises(ShardError, match="collecting parts"):
            rows.restore(manifest)
        assert rows.discard_pending(2) >= 1
        assert rows.restore(manifest) == 1 and rows.applied_steps() == {layer: 1}
        torch.testing.assert_close(pull_tables(cfg)[layer], after_one, rtol=0, atol=0)
        from engram.config import ConfigError
        from trainer.ray_trainer import train_ray

        with pytest.raises(ConfigError, match="already trained"):  # a fresh run on trained tables
            train_ray(cfg)
        # the trainer refuses to compute a step whose tables are already ahead of it
        step = RemoteStep(
            model=None,
            ddp=None,
            shards=rows,
            backbone_opt=None,
            cfg=cfg,
            rank=0,
            world=1,  # type: ignore[arg-type]
            device="cpu",
        )
        ids2 = np.array([1, 2])
        pre = Prefetch(
            step=1,
            max_staleness=0,
            x_BT=np.zeros((1, 1), dtype=np.int64),
            indices={layer: (torch.from_numpy(ids2), torch.zeros(1, 1, 1, dtype=torch.long))},
            futures={layer: rows.lookup(layer, ids2, step=1, max_staleness=0)},
        )
        with pytest.raises(StaleRowsError, match="ahead of the dense state"):
            step.fetch(1, pre, need_grad=True)
        rows.close()
    finally:
        cluster.stop()


def train_while_rebalancing(cluster: LocalCluster, cfg, data, *, num_shards: int):
    """Sync Ray training while a rebalancer (admin identity) moves the cluster to `num_shards` once
    training is under way (step 3 applied) -> (training result, rebalance report, the oldest applied
    step right after the move)."""
    import threading
    import time

    from services.client import ShardClient
    from services.control.rebalance import rebalance
    from trainer.ray_trainer import train_ray

    seen: dict = {}

    async def move() -> None:
        cp = cluster.control()
        client = await ShardClient.connect(cp, security=cluster.security("admin"))
        try:
            deadline = time.monotonic() + 180
            while min((await client.applied_steps()).values()) < 3:  # training is under way
                assert time.monotonic() < deadline, "training did not start"
                await asyncio.sleep(0.01)
            seen["report"] = await rebalance(cp, num_shards=num_shards, security=cluster.security("admin"))
            seen["applied_after"] = min((await client.applied_steps()).values())
        finally:
            await client.close()
            await cp.close()

    def run_move() -> None:
        try:
            asyncio.run(move())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            seen["error"] = exc

    mover = threading.Thread(target=run_move, daemon=True)
    mover.start()
    result = train_ray(cfg, data=data)
    mover.join(timeout=60)
    assert not mover.is_alive() and "error" not in seen, seen.get("error")
    return result, seen["report"], seen["applied_after"]


def test_slots_move_during_sync_training_and_the_losses_stay_equal(ray_session, workdir, reference) -> None:
    """1 -> 2 shards while the trainer runs: lookups and pushes follow the new slot map, and the run
    equals single-process training (the rebalancer waits out half-collected steps; parts touching
    migrating slots are re-sent once the new map is installed)."""
    _, data, local, local_model = reference
    cluster, ov = start_cluster(workdir, "move", num_shards=1)
    try:
        assert cluster.add_shard() == 1  # registered, owns no slots until the rebalance
        cfg = load_config("tiny", None, ov)
        result, report, applied_after = train_while_rebalancing(cluster, cfg, data, num_shards=2)
        assert (report.old_epoch, report.new_epoch) == (1, 2) and report.moves and list(report.moves) == [(0, 1)]
        assert len(report.moves[(0, 1)]) == cfg.cluster.num_slots // 2
        assert applied_after < cfg.train.steps, "the slots moved after training had finished"
        np.testing.assert_allclose(result.train_losses, local.train_losses, rtol=1e-4, atol=0)
        np.testing.assert_allclose([v for _, v in result.val_losses], [v for _, v in local.val_losses], rtol=1e-4)
        assert result.staleness["max"] == 0
        with SyncShardClient.connect(cfg) as shards:
            stats = shards.stats()
            half = cfg.cluster.num_slots // 2
            assert sorted(len(st.slots) for st in stats.values()) == [half, half] and {
                st.epoch for st in stats.values()
            } == {2}
            assert {t.applied_step for st in stats.values() for t in st.tables} == {cfg.train.steps}
        for layer, rows in pull_tables(cfg).items():
            torch.testing.assert_close(rows, local_model.tables[str(layer)].weight.detach(), rtol=0, atol=1e-5)
    finally:
        cluster.stop()
