"""Data-parallel training on Ray Train with the Engram tables on the memory shards: the driver.

`train_ray` prepares the data (cached, so workers only read it), checks the cluster (a fresh run
needs untrained shards; `--resume` needs a checkpoint), runs a `TorchTrainer` (gloo on CPU, NCCL
on GPU) whose workers run trainer.loop (trainer/ray_worker.py), then exports the final model as
a normal local checkpoint (dense weights + tables pulled back from the shards) for `engram serve`.

Checkpoints are Ray Train's: <out_dir>/ray/step_XXXXXX/{dense.pt, shards.json}. The run name is
the same for a run and its resume, so Ray Train hands the last registered checkpoint to the
workers (`ray.train.get_checkpoint()`); a fresh run moves an earlier run's directory aside.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engram.checkpoint import save_checkpoint
from engram.config import Config, ConfigError, config_from_dict
from engram.data import prepare_data
from engram.engram_layer import LocalEngramTable
from engram.model import EngramLM
from services.client.sync import SyncShardClient
from trainer.local import TrainResult
from trainer.loop import StepHook
from trainer.plots import plot_loss_curves
from trainer.ray_worker import DENSE_FILE, MANIFEST_FILE, load_dense, shard_model, train_loop
from trainer.step import step_flops

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_RUN_NAME = "ray"  # Ray Train's run name under <out_dir>: the same for a run and its --resume


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
    checkout as its working_dir.

    The console stays the driver's (trainer.ray_console): workers' output and Ray's INFO logs go
    to Ray's log files, not to the driver (`log_to_driver=False`, logging at WARNING)."""
    import logging

    import ray

    kw.setdefault("log_to_driver", False)
    kw.setdefault("logging_level", logging.WARNING)
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
        raise ConfigError(
            "dist.use_gpu: no GPU is visible (torch.cuda / the Ray cluster has none); "
            "train on CPU with dist.use_gpu=false"
        )
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
        raise ConfigError(
            "engram.freeze_table: an ablation for local training only (the shards always train their rows)"
        )
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


# ---------------------------------------------------------------------------------------------
# the driver


def checkpoint_dirs(cfg: Config) -> list[Path]:
    """The dense checkpoints this run's Ray storage holds (step_*/ with both files), by step.

    A listing for people and tests; resuming asks Ray Train (`ray.train.get_checkpoint()`)."""
    found = [p.parent for p in ray_run_dir(cfg).glob(f"step_*/{MANIFEST_FILE}") if (p.parent / DENSE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def ray_run_dir(cfg: Config) -> Path:
    """Ray Train's run directory: RunConfig(storage_path=<out_dir>, name="ray")."""
    return Path(cfg.train.out_dir) / RAY_RUN_NAME


def latest_checkpoint_step(cfg: Config) -> int:
    """The step of the checkpoint Ray Train resumes this run from; ConfigError when there is none."""
    from ray.train import Result

    try:
        latest = Result.from_path(str(ray_run_dir(cfg)))
    except RuntimeError as exc:  # no run directory, or no checkpoint list in it
        raise ConfigError(f"--resume: no Ray Train checkpoint under {ray_run_dir(cfg)} ({exc})") from exc
    if latest.checkpoint is None or not latest.metrics:
        raise ConfigError(f"--resume: the run under {ray_run_dir(cfg)} registered no checkpoint")
    return int(latest.metrics["step"])


def export_model(cfg: Config, ckpt_dir: Path, data: tuple, *, path: Path) -> Path:
    """Dense state of `ckpt_dir` + tables pulled from the shards -> an engram.checkpoint file."""
    tokenizer, vocab, _ = data
    state = load_dense(ckpt_dir)
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
    save_checkpoint(
        path,
        model=model,
        optimizers=(_Saved(), None),
        step=int(state["step"]),
        cfg=cfg,
        compress_lookup=vocab.lookup,
        tokenizer_json=tokenizer.to_str(),
        history=h,
    )
    return path


def _fresh_run(cfg: Config) -> None:
    """A new run: the shards must be untrained, and Ray must not resume an earlier run of this out_dir
    (its directory is moved aside, not deleted)."""
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
    run_dir = ray_run_dir(cfg)
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}-before-{time.strftime('%Y%m%d-%H%M%S')}"))


def train_ray(
    cfg: Config,
    *,
    data: tuple | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    on_step: StepHook | None = None,
    label: str = "ray",
    torch_threads: int = 1,
) -> RayTrainResult:
    """Train `cfg` on Ray (ray.init must have been called, or a local instance is started).

    `resume`: Ray Train restores the run's last checkpoint (dense state, and the shards from its
    manifest). `on_step(step, rank)` runs in every worker after each step (tests inject faults).
    """
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.ray_console import CheckpointLog, DriverConsole, new_queue

    check_dist_config(cfg, gpus=None)  # the GPU count is checked below, once Ray is connected
    cfg = absolute_paths(config_from_dict(cfg.to_dict()))
    data = data if data is not None else prepare_data(cfg)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint_step(cfg) if resume else 0  # fail fast when there is nothing to resume from
    if not resume:
        _fresh_run(cfg)
    if not ray.is_initialized():
        init_ray(cfg.dist.ray_address)
    workers = check_dist_config(cfg)
    assert workers is not None, "Ray is connected: its GPUs are known"
    cfg.dist.num_workers = workers  # resolved: 0 -> one per GPU
    run_id = f"{out.name}-{int(time.time())}"
    queue = new_queue()
    loop_cfg = {
        "config": cfg.to_dict(),
        "stop_at": stop_at,
        "on_step": on_step,
        "label": label,
        "run_id": run_id,
        "torch_threads": torch_threads,
        "console": queue,
        "shard_ckpt_name": re.sub(r"[^A-Za-z0-9._-]", "-", run_id).lstrip("."),  # under cluster.checkpoint_dir
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=cfg.dist.num_workers,
            use_gpu=cfg.dist.use_gpu,
            resources_per_worker={"CPU": 1} if not cfg.dist.use_gpu else None,
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(out),
            failure_config=FailureConfig(max_failures=0),
            # ray.train exports Train v2's RunConfig/UserCallback at run time, but its __init__ imports
            # v1's first, and that is the one mypy reads
            callbacks=[CheckpointLog(queue)],  # type: ignore[list-item]
            logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ),
    )
    with DriverConsole(queue, label=label, start=start, total=cfg.train.steps, show_bar=cfg.train.progress):
        fit = trainer.fit()
    m = fit.metrics or {}
    start = int(m.get("resumed_from", start))
    result = RayTrainResult(
        final_val_loss=m["val_losses"][-1][1] if m.get("val_losses") else float("nan"),
        train_losses=list(m.get("train_losses", [])),
        val_losses=[tuple(v) for v in m.get("val_losses", [])],
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        staleness=m.get("staleness", {}),
        timings=m.get("timings_s", {}),
        resumed_from=start,
    )
    if int(m.get("step", 0)) == cfg.train.steps and fit.checkpoint is not None:
        with fit.checkpoint.as_directory() as d:
            result.checkpoint = str(export_model(cfg, Path(d), data, path=out / "checkpoint.pt"))
    plot_loss_curves({label: result}, out / "loss.png")
    (out / "result.json").write_text(
        json.dumps(
            {
                "final_val_loss": result.final_val_loss,
                "val_losses": result.val_losses,
                "train_losses": result.train_losses,
                "tokens_per_s": result.tokens_per_s,
                "staleness": result.staleness,
                "timings_s": result.timings,
                "mode": cfg.dist.mode,
                "num_workers": cfg.dist.num_workers,
                "resumed_from": start,
                "step_flops": step_flops(
                    shard_model(cfg, data[1].lookup), batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len
                ),
            },
            indent=2,
        )
    )
    return result
