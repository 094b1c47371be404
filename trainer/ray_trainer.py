"""Data-parallel training on Ray Train with the Engram tables on the memory shards.

Driver (`train_ray`): prepares the data (cached, so workers only read it), finds the last
consistent checkpoint when resuming and restores the shards from its manifest, runs a
`TorchTrainer` (gloo on CPU, NCCL on GPU), then exports the final model as a normal local
checkpoint (dense weights + tables pulled back from the shards) for `engram serve`.

Worker (`train_loop`): samples the same global batch sequence as `trainer.local` (one batch
ahead, so that `RemoteStep` prefetches the next step's rows) and keeps its slice (rank), runs
`RemoteStep` per step, evaluates, and at each checkpoint step settles the
shards, checkpoints every shard at that step (manifest in Redis) and reports a Ray Train
checkpoint holding the dense state *and* that manifest: dense state and tables always agree.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engram.config import Config, ConfigError, config_from_dict
from engram.data import prepare_data
from engram.engram_layer import LocalEngramTable
from engram.model import EngramLM
from engram.precision import configure_tf32
from services.client import ShardError
from services.client.sync import SyncShardClient
from services.torch_io import load_checkpoint_file
from trainer.checkpoint import atomic_torch_save, save_checkpoint
from trainer.local import TrainResult
from trainer.plots import plot_loss_curves
from trainer.remote_step import RemoteStep
from trainer.step import build_optimizers, step_flops

REPO_ROOT = Path(__file__).resolve().parents[1]
DENSE_FILE, MANIFEST_FILE = "dense.pt", "shards.json"


@dataclass
class RayTrainResult(TrainResult):
    """The local trainer's result plus what only a distributed run has."""

    staleness: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    resumed_from: int = 0


def absolute_paths(cfg: Config) -> Config:
    """Workers may run in another directory: every path of the config made absolute (in place)."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).resolve())
    cfg.train.corpus = [str(Path(p).expanduser().resolve()) for p in cfg.train.corpus]
    cfg.tokenizer.cache_dir = str(Path(cfg.tokenizer.cache_dir).resolve())
    cfg.cluster.checkpoint_dir = str(Path(cfg.cluster.checkpoint_dir).resolve())
    if cfg.tokenizer.path:
        cfg.tokenizer.path = str(Path(cfg.tokenizer.path).resolve())
    return cfg


def init_ray(address: str | None = None, **kw) -> None:  # type: ignore[no-untyped-def]
    """ray.init for this repo: local workers find the packages through PYTHONPATH (inherited by
    the raylet, so prestarted default workers can host the actors); a remote cluster gets this
    checkout as its working_dir."""
    import ray

    if address:
        # A source checkout travels as the job's working_dir; an installed package (the container
        # image: REPO_ROOT is site-packages) is already on every node of the cluster.
        runtime_env = {"working_dir": str(REPO_ROOT), "excludes": [".venv/", ".git/", "runs/", ".cache/"]}
        ray.init(address=address, runtime_env=runtime_env if (REPO_ROOT / "pyproject.toml").is_file() else None, **kw)
        return
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    ray.init(include_dashboard=False, **kw)


CPU_WORKERS = 2  # dist.num_workers=0 without GPUs


def available_gpus(cfg: Config) -> int | None:
    """GPUs this run can place workers on: the Ray cluster's once connected, else this machine's;
    None while a remote cluster (dist.ray_address) is not connected yet."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    if cfg.dist.ray_address:
        return None
    return torch.cuda.device_count()


def resolve_workers(cfg: Config, *, gpus: int | None) -> int | None:
    """dist.num_workers (0 -> one per GPU, or CPU_WORKERS on CPU), checked against the GPUs there are.

    Ray would wait forever to place a worker that asks for a GPU no node has, and two NCCL ranks
    on one GPU fail ("Duplicate GPU detected"): more workers than GPUs is a ConfigError.
    -> the worker count, or None when the GPUs are not known yet (see `available_gpus`).
    """
    d = cfg.dist
    if not d.use_gpu:
        return d.num_workers or CPU_WORKERS
    if gpus is None:
        return d.num_workers or None
    if gpus < 1:
        raise ConfigError("dist.use_gpu: no GPU is visible (torch.cuda / the Ray cluster has none); "
                          "train on CPU with dist.use_gpu=false")
    if d.num_workers > gpus:
        raise ConfigError(
            f"dist.num_workers: {d.num_workers} workers with dist.use_gpu=true need one GPU each, but there "
            f"{'is' if gpus == 1 else 'are'} {gpus}; set dist.num_workers={gpus} or 0 (one worker per GPU)"
        )
    return d.num_workers or gpus


def check_dist_config(cfg: Config, *, gpus: int | None = -1) -> int | None:
    """Fail fast with a ConfigError; -> the resolved worker count (None: GPUs not known yet).

    `gpus=-1` asks `available_gpus`; tests pass a count."""
    d, t = cfg.dist, cfg.train
    if not cfg.engram.enabled:
        raise ConfigError("engram.enabled: distributed training pushes Engram rows to the shards; enable Engram")
    if cfg.engram.freeze_table:
        raise ConfigError("engram.freeze_table: an ablation for local training only (the shards always train their rows)")
    if t.grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum: {t.grad_accum} is for local training (it reproduces {t.grad_accum} workers' split); "
            "on Ray the global batch splits over dist.num_workers"
        )
    workers = resolve_workers(cfg, gpus=available_gpus(cfg) if d.use_gpu and gpus == -1 else gpus)
    if workers is not None and t.batch_size % workers:
        raise ConfigError(
            f"train.batch_size: the global batch of {t.batch_size} does not split evenly over "
            f"{workers} workers (dist.num_workers={d.num_workers})"
        )
    return workers


def shard_model(cfg: Config, compress_lookup: np.ndarray) -> EngramLM:
    """The model a worker trains: same dense init as trainer.local, no local tables (rows are remote)."""
    torch.manual_seed(cfg.train.seed)
    return EngramLM(cfg, compress_lookup, local_tables=False)


# ---------------------------------------------------------------------------------------------
# checkpoints on disk: <out_dir>/ray/<run>/step_XXXXXX/{dense.pt, shards.json}


def checkpoint_dirs(cfg: Config) -> list[Path]:
    """Dense checkpoints under <out_dir>/ray (any run) holding both files, oldest written first."""
    root = Path(cfg.train.out_dir) / "ray"
    found = [p.parent for p in root.glob(f"**/step_*/{MANIFEST_FILE}") if (p.parent / DENSE_FILE).is_file()]
    return sorted(found, key=lambda p: ((p / DENSE_FILE).stat().st_mtime, int(p.name.split("_")[1])))


def _intact(ckpt_dir: Path) -> bool:
    """A trainer killed while Ray copied a checkpoint to storage can leave a truncated file."""
    try:
        load_checkpoint_file(ckpt_dir / DENSE_FILE)
        json.loads((ckpt_dir / MANIFEST_FILE).read_text())
    except Exception:  # noqa: BLE001 - any unreadable file means: not this one
        return False
    return True


def _report(metrics: dict, state: dict | None, manifest: dict | None, step: int) -> None:
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        atomic_torch_save(state, Path(tmp) / DENSE_FILE)
        (Path(tmp) / MANIFEST_FILE).write_text(json.dumps(manifest))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:06d}")


# ---------------------------------------------------------------------------------------------
# the worker


def train_loop(loop_cfg: dict) -> None:
    import ray.train
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from services.telemetry import setup_telemetry

    cfg = config_from_dict(loop_cfg["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tel = setup_telemetry("engram-trainer", attributes={"engram.rank": rank})  # this worker process's entry
    device = str(ray.train.torch.get_device()) if cfg.dist.use_gpu else "cpu"
    configure_tf32(device, cfg.train.tf32)
    torch.set_num_threads(max(1, int(loop_cfg.get("torch_threads", 1))))
    _, vocab, dataset = prepare_data(cfg)
    model = shard_model(cfg, vocab.lookup).to(device)
    backbone_opt, _ = build_optimizers(model, t)
    start = 0
    history: dict[str, list] = {"train_losses": [], "val_losses": []}
    if loop_cfg.get("resume_dir"):
        state = load_checkpoint_file(Path(loop_cfg["resume_dir"]) / DENSE_FILE, map_location=device)
        model.load_state_dict(state["model"])
        backbone_opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), state["history"]
    ddp = model if world == 1 else DistributedDataParallel(
        model, device_ids=[torch.device(device)] if device.startswith("cuda") else None)
    rows = SyncShardClient.connect(cfg)
    applied = min(rows.applied_steps().values())
    if applied != start:
        raise RuntimeError(
            f"the shards' tables are at step {applied} but the dense state is at step {start}: "
            + ("restore the matching checkpoint" if start else "start from a fresh cluster (engram up) or --resume")
        )
    step_runner = RemoteStep(model=model, ddp=ddp, shards=rows, backbone_opt=backbone_opt, cfg=cfg,
                             rank=rank, world=world, device=device)
    rng = np.random.default_rng(t.seed)
    for _ in range(start):  # replay the sampler: a resumed run sees the same batches
        dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
    eval_batches = dataset.iter_eval_batches("val", batch_size=t.batch_size, seq_len=t.seq_len,
                                             num_batches=t.eval_batches)
    bar = tqdm(range(start, t.steps), disable=rank != 0 or not t.progress, desc=loop_cfg.get("label", "ray"),
               mininterval=1.0, dynamic_ncols=True)
    stop_at, crash_at = loop_cfg.get("stop_at"), loop_cfg.get("crash_at")
    tokens, t0, timings = 0, time.perf_counter(), np.zeros(3)
    nxt = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng) if start < t.steps else None
    for step0 in bar:
        assert nxt is not None
        x, y = nxt  # (B, T) global
        nxt = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng) if step0 + 1 < t.steps else None
        out = step_runner.train_step(step0, x, y, next_x=None if nxt is None or not cfg.dist.prefetch else nxt[0])
        done = step0 + 1
        if crash_at is not None and done == crash_at and rank == 0:
            os._exit(1)  # tests: the trainer dies after pushing its part of step `crash_at`
        history["train_losses"].append(out.loss)
        tokens += out.tokens
        timings += (out.lookup_s, out.compute_s, out.push_s)
        tok_s = tokens / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tok_s:,.0f}", stale=out.staleness,
                        blocked=f"{timings[0] + timings[2]:.1f}s")
        if done % t.eval_every == 0 or done == t.steps:
            history["val_losses"].append((done, step_runner.evaluate(eval_batches, done)))
            if rank == 0:
                bar.write(f"step {done}: val loss {history['val_losses'][-1][1]:.4f}")
        last = done == t.steps or (stop_at is not None and done >= stop_at)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or last:
            step_runner.settle(done)
            if world > 1:
                dist.barrier()
            wall = time.perf_counter() - t0
            mean = torch.tensor([*timings.tolist(), wall], dtype=torch.float64)  # (lookup, compute, push, wall)
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            metrics = {
                "step": done, "loss": out.loss, "tokens_per_s": tok_s, "world": world,
                "staleness": step_runner.staleness.as_dict(),
                # mean over workers; blocked = waiting on the shards (lookups + pushes), of the loop's wall time
                "timings_s": {**dict(zip(("lookup", "compute", "push", "wall"), mean.tolist())),
                              "blocked": float(mean[0] + mean[2]), "blocked_fraction": float((mean[0] + mean[2]) / mean[3])},
                "train_losses": history["train_losses"], "val_losses": history["val_losses"],
            }
            state = manifest = None
            if rank == 0:
                manifest = rows.checkpoint(f"{loop_cfg['shard_ckpt_name']}/step_{done:06d}", done,
                                           extra={"run": loop_cfg["run_id"], "world": world})
                state = {"step": done, "model": model.state_dict(), "optimizer": backbone_opt.state_dict(),
                         "history": history, "config": cfg.to_dict(), "world": world}
                bar.write(f"checkpoint step {done}: dense state + {len(manifest['files'])} slot files")
            _report(metrics, state, manifest, done)
        if last:
            break
    step_runner.close()
    rows.close()
    tel.shutdown()


# ---------------------------------------------------------------------------------------------
# the driver


def _restore(cfg: Config, ckpt_dir: Path) -> int:
    manifest = json.loads((ckpt_dir / MANIFEST_FILE).read_text())
    rows = SyncShardClient.connect(cfg)
    try:
        try:
            return rows.restore(manifest)
        except ShardError as exc:
            if exc.code.name != "FAILED_PRECONDITION" or "collecting parts" not in str(exc):
                raise
            # a step half-pushed by the trainer that died: finish it, the restore overwrites it
            rows.discard_pending(int(manifest.get("world", cfg.dist.num_workers)))
            return rows.restore(manifest)
    finally:
        rows.close()


def export_model(cfg: Config, ckpt_dir: Path, data: tuple, path: Path) -> Path:
    """Dense state of `ckpt_dir` + tables pulled from the shards -> a trainer.checkpoint file."""
    tokenizer, vocab, _ = data
    state = load_checkpoint_file(ckpt_dir / DENSE_FILE)
    model = EngramLM(cfg, vocab.lookup)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(k.startswith("tables.") for k in missing), (missing, unexpected)
    rows = SyncShardClient.connect(cfg)
    try:
        assert model.indexer is not None
        for layer in model.indexer.layouts:
            with torch.no_grad():
                table = model.tables[str(layer)]
                assert isinstance(table, LocalEngramTable)
                table.weight.copy_(rows.pull_table(layer))  # (R, dh)
    finally:
        rows.close()

    class _Saved:  # the backbone optimizer state, as save_checkpoint expects an optimizer
        def state_dict(self) -> dict:
            return state["optimizer"]

    h = state["history"]
    save_checkpoint(path, model=model, optimizers=(_Saved(), None), step=int(state["step"]), cfg=cfg,
                    compress_lookup=vocab.lookup, tokenizer_json=tokenizer.to_str(), history=h)
    return path


def train_ray(
    cfg: Config, *, data: tuple | None = None, resume: bool = False, stop_at: int | None = None,
    crash_at: int | None = None, label: str = "ray", torch_threads: int = 1,
) -> RayTrainResult:
    """Train `cfg` on Ray (ray.init must have been called, or a local instance is started)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_dist_config(cfg, gpus=None)  # the GPU count is checked below, once Ray is connected
    cfg = absolute_paths(config_from_dict(cfg.to_dict()))
    data = data if data is not None else prepare_data(cfg)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_dir, start = None, 0
    if resume:
        found = [d for d in checkpoint_dirs(cfg) if _intact(d)]
        if not found:
            raise ConfigError(f"--resume: no checkpoint (step_*/{DENSE_FILE} + {MANIFEST_FILE}) under {out / 'ray'}")
        resume_dir = found[-1]
        start = _restore(cfg, resume_dir)
    else:
        rows = SyncShardClient.connect(cfg)
        try:
            applied = rows.applied_steps()
        finally:
            rows.close()
        if max(applied.values()) > 0:
            raise ConfigError(
                f"cluster.namespace={cfg.cluster.namespace!r}: the shards' tables were already trained "
                f"(applied steps {applied}); pass --resume, or start a fresh cluster (engram up)"
            )
    if not ray.is_initialized():
        init_ray(cfg.dist.ray_address)
    workers = check_dist_config(cfg)
    assert workers is not None, "Ray is connected: its GPUs are known"
    cfg.dist.num_workers = workers  # resolved: 0 -> one per GPU
    run_id = f"{out.name}-{int(time.time())}"
    loop_cfg = {
        "config": cfg.to_dict(), "resume_dir": str(resume_dir) if resume_dir else None, "stop_at": stop_at,
        "crash_at": crash_at, "label": label, "run_id": run_id, "torch_threads": torch_threads,
        "shard_ckpt_name": re.sub(r"[^A-Za-z0-9._-]", "-", run_id).lstrip("."),  # under cluster.checkpoint_dir
    }
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                     resources_per_worker={"CPU": 1} if not cfg.dist.use_gpu else None),
        run_config=RunConfig(name=run_id, storage_path=str(out / "ray"), failure_config=FailureConfig(max_failures=0)),
    )
    fit = trainer.fit()
    m = fit.metrics or {}
    last = checkpoint_dirs(cfg)[-1]
    result = RayTrainResult(
        final_val_loss=m["val_losses"][-1][1] if m.get("val_losses") else float("nan"),
        train_losses=list(m.get("train_losses", [])), val_losses=[tuple(v) for v in m.get("val_losses", [])],
        tokens_per_s=float(m.get("tokens_per_s", 0.0)), staleness=m.get("staleness", {}),
        timings=m.get("timings_s", {}), resumed_from=start,
    )
    if int(m.get("step", 0)) == cfg.train.steps:
        result.checkpoint = str(export_model(cfg, last, data, out / "checkpoint.pt"))
    plot_loss_curves({label: result}, out / "loss.png")
    (out / "result.json").write_text(json.dumps({
        "final_val_loss": result.final_val_loss, "val_losses": result.val_losses, "train_losses": result.train_losses,
        "tokens_per_s": result.tokens_per_s, "staleness": result.staleness, "timings_s": result.timings,
        "mode": cfg.dist.mode, "num_workers": cfg.dist.num_workers, "resumed_from": start,
        "step_flops": step_flops(shard_model(cfg, data[1].lookup), batch_size=cfg.train.batch_size,
                                 seq_len=cfg.train.seq_len),
    }, indent=2))
    return result
