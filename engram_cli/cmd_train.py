"""`engram train`: train on the default (or given) corpus and report validation loss.

Local (default): one process, the tables in the model. `--ray`: Ray Train data-parallel
workers, the tables on the memory shards of the cluster `engram up` started (cluster.redis_url
/ cluster.namespace), or of a LocalCluster started for this run with `--up`. Ray runs locally
unless RAY_ADDRESS (Ray's own convention) or dist.ray_address names a cluster.
"""

from __future__ import annotations

import argparse
import copy
import os

from engram.config import ConfigError, load_config
from engram.config_args import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (local: <out_dir>/checkpoint.pt; --ray: the last "
        "dense+shard checkpoint under <out_dir>/ray, restored onto the shards)",
    )
    parser.add_argument(
        "--compare-baseline",
        action="store_true",
        help="also train the same backbone without Engram on the same tokens and print both losses",
    )
    parser.add_argument(
        "--sample",
        default=None,
        metavar="PROMPT",
        help="after training, print a sampled continuation of PROMPT from the trained model",
    )
    parser.add_argument("--sample-tokens", type=int, default=48, help="tokens to generate for --sample")
    parser.add_argument(
        "--sample-temperature",
        type=float,
        default=0.8,
        help="--sample: temperature (0 = greedy, which loops on small models), nucleus top_p 0.95, seed 0",
    )
    ray = parser.add_argument_group("distributed (Ray)")
    ray.add_argument("--ray", action="store_true", help="train on Ray with the Engram tables on the memory shards")
    ray.add_argument("--mode", choices=("sync", "async"), default=None, help="dist.mode (default sync)")
    ray.add_argument("--staleness", type=int, default=None, help="dist.staleness: async bound k (default 1)")
    ray.add_argument(
        "--workers", type=int, default=None, help="dist.num_workers (default: one per GPU with --gpu, else 2)"
    )
    ray.add_argument("--gpu", action="store_true", help="dist.use_gpu: one GPU per worker, NCCL")
    ray.add_argument(
        "--up",
        action="store_true",
        help="start a local cluster (Redis + cluster.num_shards shards) for this run and stop it after",
    )
    ray.add_argument(
        "--insecure",
        action="store_true",
        help="with --up: plaintext, no roles, no Redis password (default: mTLS, the trainer gets the train role)",
    )
    parser.set_defaults(func=run)


def _dist_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.mode is not None:
        out.append(f"dist.mode={args.mode}")
    if args.staleness is not None:
        out.append(f"dist.staleness={args.staleness}")
    if args.workers is not None:
        out.append(f"dist.num_workers={args.workers}")
    if args.gpu:
        out.append("dist.use_gpu=true")
    return out


def run(args: argparse.Namespace) -> int:
    if (args.mode or args.staleness is not None or args.workers or args.gpu or args.up) and not args.ray:
        raise ConfigError("--mode/--staleness/--workers/--gpu/--up: only with --ray")
    overrides = list(args.overrides) + _dist_overrides(args)
    cfg = load_config(args.preset, args.config, overrides)
    from services.telemetry import setup_telemetry

    tel = setup_telemetry("engram-train")  # OTEL_* variables are read here, once (Ray workers: train_loop)
    try:
        return _train(args, cfg, overrides)
    finally:
        tel.shutdown()


def _train(args: argparse.Namespace, cfg, overrides: list[str]) -> int:  # type: ignore[no-untyped-def]
    from engram.data import prepare_data

    data = prepare_data(cfg)
    tok, vocab, dataset = data
    print(
        f"corpus: {dataset.train.size:,} train / {dataset.val.size:,} val tokens; vocab {vocab.vocab_size} "
        f"-> {vocab.size} after compression ({100 * vocab.ratio:.1f}% smaller)"
    )
    if args.ray:
        return _run_ray(args, cfg, overrides, data=data)
    from trainer.local import train_local

    result = train_local(cfg, data=data, resume=args.resume, label="engram" if cfg.engram.enabled else "baseline")
    print(
        f"validation loss {result.final_val_loss:.4f} ({result.tokens_per_s:,.0f} tokens/s); "
        f"checkpoint {result.checkpoint}"
    )
    _after_training(args, cfg, data, val_loss=result.final_val_loss, checkpoint=result.checkpoint)
    return 0


def _after_training(args: argparse.Namespace, cfg, data: tuple, *, val_loss: float, checkpoint: str) -> None:  # type: ignore[no-untyped-def]
    """--compare-baseline (the same backbone without Engram, trained locally on the same tokens) and --sample."""
    from trainer.local import train_local

    if args.compare_baseline and cfg.engram.enabled:
        base_cfg = copy.deepcopy(cfg)
        base_cfg.engram.enabled = False
        base_cfg.train.out_dir = cfg.train.out_dir.rstrip("/") + "-baseline"
        base = train_local(base_cfg, data=data, label="baseline")
        gain = (base.final_val_loss - val_loss) / base.final_val_loss
        print(
            f"\n{'model':<10} {'val loss':>9}\n{'baseline':<10} {base.final_val_loss:>9.4f}\n"
            f"{'engram':<10} {val_loss:>9.4f}\nEngram: validation loss {100 * abs(gain):.2f}% "
            f"{'lower' if gain >= 0 else 'HIGHER'} than the baseline"
        )
        print(
            f"This is one seed (train.seed={cfg.train.seed}): the gain varies from seed to seed at this size. "
            "For a mean over seeds with a 95% interval run: python -m benchmarks.quality --seeds 3"
        )
    if args.sample is not None and checkpoint:
        from worker.sample import sample_from_checkpoint

        t = args.sample_temperature
        text = sample_from_checkpoint(checkpoint, args.sample, max_new_tokens=args.sample_tokens, temperature=t)
        how = "greedy" if t == 0 else f"temperature {t:g}, top_p 0.95, seed 0"
        print(f"\nsample ({how}) from {checkpoint}:\n{args.sample}{text}")


def _run_ray(args: argparse.Namespace, cfg, overrides: list[str], *, data: tuple) -> int:  # type: ignore[no-untyped-def]
    import ray

    from trainer.ray_trainer import check_dist_config, init_ray, train_ray

    workers = check_dist_config(cfg)  # before any process starts: too many GPU workers is an error, not a hang
    cluster = None
    if args.up:
        from services.launcher import LocalCluster

        cluster = LocalCluster(  # mTLS and roles, a Redis password and a signed control plane, as `engram up`
            cfg,
            preset=args.preset,
            config_file=args.config,
            overrides=overrides,
            tls=not args.insecure,
            secure=not args.insecure,
        ).start()
        # the trainer's role is train: it pushes, checkpoints and, on --resume, restores
        cfg = load_config(
            args.preset, args.config, overrides + cluster.cluster_overrides + cluster.client_overrides("train")
        )
        print(f"cluster: redis {cluster.redis_url}, shards {cluster.addresses}")
    address = os.environ.get("RAY_ADDRESS") or cfg.dist.ray_address  # Ray's own convention, read only here
    try:
        init_ray(address)
        result = train_ray(cfg, data=data, resume=args.resume, label=f"ray-{cfg.dist.mode}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()
    st, tm = result.staleness, result.timings
    print(
        f"validation loss {result.final_val_loss:.4f} ({result.tokens_per_s:,.0f} tokens/s, "
        f"{workers or 'auto'} workers, {cfg.dist.mode}; staleness max {st.get('max')} mean "
        f"{st.get('mean', 0):.2f}; blocked on the shards {tm.get('blocked', 0):.1f} s = "
        f"{100 * tm.get('blocked_fraction', 0):.1f}% of {tm.get('wall', 0):.1f} s (lookups "
        f"{tm.get('lookup', 0):.1f} s, pushes {tm.get('push', 0):.1f} s, per worker)); "
        f"checkpoint {result.checkpoint or '(run stopped early)'}"
    )
    if not address:
        print("Ray's own output (workers, controller): /tmp/ray/session_latest/logs")
    _after_training(args, cfg, data, val_loss=result.final_val_loss, checkpoint=result.checkpoint)
    return 0
