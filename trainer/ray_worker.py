"""A Ray Train worker: trainer.loop with remote rows (RemoteStep) and DDP.

Each worker samples the same global batch sequence as trainer.local and keeps its slice (rank).
Resuming is Ray's: `ray.train.get_checkpoint()` is the last checkpoint this run (RunConfig name
+ storage path) reported, also after a restart of the worker group. Rank 0 restores the shards
from that checkpoint's manifest before any worker reads a row.

At each checkpoint step every worker settles its pushes, rank 0 checkpoints every shard at that
step (manifest in Redis) and reports a Ray Train checkpoint holding the dense state *and* that
manifest: dense state and tables always agree.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.checkpoint import atomic_torch_save
from engram.config import Config, config_from_dict
from engram.data import prepare_data
from engram.model import EngramLM
from engram.precision import configure_tf32
from engram.torch_io import load_checkpoint_file
from services.client import Reason, ShardError, error_reason
from services.client.sync import SyncShardClient
from trainer.loop import Bar, DDPSync, GradSync, LoopStats, NoSync, console_bar, mean_timings, run_loop
from trainer.remote_step import RemoteStep
from trainer.step import build_optimizers

DENSE_FILE, MANIFEST_FILE = "dense.pt", "shards.json"


def shard_model(cfg: Config, compress_lookup: np.ndarray) -> EngramLM:
    """The model a worker trains: same dense init as trainer.local, no local tables (rows are remote)."""
    torch.manual_seed(cfg.train.seed)
    return EngramLM(cfg, compress_lookup, local_tables=False)


def load_dense(ckpt_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """dense.pt of a checkpoint: tensors, numbers, strings and containers only (weights_only)."""
    return load_checkpoint_file(ckpt_dir / DENSE_FILE, map_location=device)


def restore_shards(cfg: Config, manifest: dict) -> int:
    """The shards' tables as of `manifest` -> its step. A step that a dead trainer half-pushed is
    discarded first (the restore overwrites it)."""
    rows = SyncShardClient.connect(cfg)
    try:
        try:
            return rows.restore(manifest)
        except ShardError as exc:
            if error_reason(exc) != Reason.COLLECTING_PARTS:
                raise
            rows.discard_pending(int(manifest.get("world", cfg.dist.num_workers)))
            return rows.restore(manifest)
    finally:
        rows.close()


@dataclass(kw_only=True)
class RayCheckpointer:
    """Settle the pushes, checkpoint the shards (rank 0) and report dense state + manifest to Ray Train."""

    cfg: Config
    model: EngramLM
    optimizer: torch.optim.Optimizer
    step_runner: RemoteStep
    rows: SyncShardClient
    sync: GradSync
    shard_ckpt_name: str  # the shards write step_N under cluster.checkpoint_dir/<this name>
    run_id: str
    resumed_from: int

    def save(self, stats: LoopStats, *, final: bool) -> None:
        import ray.train

        done = stats.step
        self.step_runner.settle(done)
        self.sync.barrier()
        metrics = {
            "step": done,
            "loss": stats.last_loss,
            "tokens_per_s": stats.tokens_per_s,
            "world": self.sync.world,
            "staleness": self.step_runner.staleness.as_dict(),
            "resumed_from": self.resumed_from,
            # mean over workers; blocked = waiting on the shards (lookups + pushes), of the loop's wall time
            "timings_s": mean_timings(stats, self.sync),
            "train_losses": stats.history["train_losses"],
            "val_losses": stats.history["val_losses"],
        }
        if self.sync.rank != 0:
            ray.train.report(metrics)
            return
        manifest = self.rows.checkpoint(
            f"{self.shard_ckpt_name}/step_{done:06d}", done, extra={"run": self.run_id, "world": self.sync.world}
        )
        metrics["slot_files"] = len(manifest["files"])
        state = {
            "step": done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": stats.history,
            "config": self.cfg.to_dict(),
            "world": self.sync.world,
        }
        with tempfile.TemporaryDirectory() as tmp:
            atomic_torch_save(state, Path(tmp) / DENSE_FILE)
            (Path(tmp) / MANIFEST_FILE).write_text(json.dumps(manifest))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{done:06d}"
            )
        # Ray Train registers a report when its controller next polls the workers: wait for that, so
        # that a trainer killed after this line resumes from this step (the other workers wait in
        # the next step's all-reduce)
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=300
        )


def _resume_state(cfg: Config, *, rank: int, device: str) -> dict | None:
    """The dense state of Ray Train's checkpoint to resume from (None: a fresh run); rank 0 also
    restores the shards from its manifest."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = load_dense(Path(d), device)
        if rank == 0:
            restored = restore_shards(cfg, json.loads((Path(d) / MANIFEST_FILE).read_text()))
            assert restored == int(state["step"]), (restored, state["step"])
    return state


def train_loop(loop_cfg: dict) -> None:
    """The function every Ray Train worker runs (TorchTrainer's train_loop_per_worker)."""
    import ray.train

    from services.telemetry import setup_telemetry

    cfg = config_from_dict(loop_cfg["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tel = setup_telemetry("engram-trainer", attributes={"engram.rank": rank})  # this worker process's entry
    device = str(ray.train.torch.get_device()) if cfg.dist.use_gpu else "cpu"  # type: ignore[attr-defined]
    configure_tf32(device, t.tf32)
    torch.set_num_threads(max(1, int(loop_cfg.get("torch_threads", 1))))
    _, vocab, dataset = prepare_data(cfg)
    model = shard_model(cfg, vocab.lookup).to(device)
    backbone_opt, _ = build_optimizers(model, t)
    start, history = 0, None
    state = _resume_state(cfg, rank=rank, device=device)
    if state is not None:
        model.load_state_dict(state["model"])
        backbone_opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), state["history"]
        history["val_losses"] = [tuple(v) for v in history["val_losses"]]
    sync = DDPSync(model, device=device) if world > 1 else NoSync(model)
    sync.barrier()  # rank 0 has restored the shards
    rows = SyncShardClient.connect(cfg)
    applied = min(rows.applied_steps().values())
    if applied != start:
        raise RuntimeError(
            f"the shards' tables are at step {applied} but the dense state is at step {start}: "
            + ("restore the matching checkpoint" if start else "start from a fresh cluster (engram up) or --resume")
        )
    step_runner = RemoteStep(
        model=model,
        ddp=sync.module,
        shards=rows,
        backbone_opt=backbone_opt,
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
    )
    checkpointer = RayCheckpointer(
        cfg=cfg,
        model=model,
        optimizer=backbone_opt,
        step_runner=step_runner,
        rows=rows,
        sync=sync,
        shard_ckpt_name=loop_cfg["shard_ckpt_name"],
        run_id=loop_cfg["run_id"],
        resumed_from=start,
    )
    queue = loop_cfg.get("console")  # trainer.ray_console: the driver draws the progress

    def make_bar(steps: range, *, desc: str, enabled: bool) -> Bar:
        from trainer.ray_console import QueueBar

        return (
            QueueBar(queue, steps, enabled=enabled)
            if queue is not None
            else console_bar(steps, desc=desc, enabled=enabled)
        )

    try:
        run_loop(
            cfg=cfg,
            backend=step_runner,
            dataset=dataset,
            checkpointer=checkpointer,
            sync=sync,
            start=start,
            history=history,
            label=loop_cfg.get("label", "ray"),
            stop_at=loop_cfg.get("stop_at"),
            on_step=loop_cfg.get("on_step"),
            make_bar=make_bar,
        )
    finally:
        step_runner.close()
        rows.close()
        tel.shutdown()
