"""`engram up`: a local cluster (Redis + N memory shards as processes) until Ctrl-C / SIGTERM.

    engram up --preset tiny --shards 2
    engram up --preset tiny --shards 3 --replicas 2     # every slot on 2 shards, failover (docs/failover.md)
    engram cluster status --preset tiny --set cluster.redis_url=... --set cluster.namespace=... --set security...

Redis gets a generated password and the control plane a generated signing key, written 0600
under <log-dir>/secrets/ (`--no-auth` turns them off). TLS and roles are on by default: a
throwaway CA and certificates (admin for the CLI, train for the trainer, read for workers) in
the log folder's tls/; `--insecure` turns them off for a trusted machine. The printed `--set`
values give other commands the admin identity.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from engram.config_args import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--shards", type=int, default=None, help="number of shards (default: cluster.num_shards)")
    parser.add_argument(
        "--replicas", type=int, default=None, help="copies of each slot on different shards (default: cluster.replicas)"
    )
    parser.add_argument("--namespace", default=None, help="control-plane key prefix (default: cluster.namespace)")
    parser.add_argument("--host", default="127.0.0.1", help="interface for Redis and the shards")
    parser.add_argument("--log-dir", default=None, help="where Redis and shard logs go (default: a temp dir)")
    parser.add_argument("--startup-timeout-s", type=float, default=180.0)
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="no Redis password and an unsigned control plane (a trusted single-user machine only)",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--tls",
        dest="tls",
        action="store_true",
        default=True,
        help="mTLS and roles with throwaway certificates (the default)",
    )
    tls.add_argument("--insecure", dest="tls", action="store_false", help="plaintext, no roles: a trusted machine only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engram.config import load_config
    from services.launcher import LauncherError, LocalCluster

    cfg = load_config(args.preset, args.config, args.overrides)
    if args.shards is not None and not 1 <= args.shards <= cfg.cluster.num_slots:
        print(f"engram up: --shards must be in 1..{cfg.cluster.num_slots} (cluster.num_slots)", file=sys.stderr)
        return 2
    shards = args.shards or cfg.cluster.num_shards
    if args.replicas is not None and not 1 <= args.replicas <= shards:
        print(f"engram up: --replicas must be in 1..{shards} (the shard count)", file=sys.stderr)
        return 2
    stop = threading.Event()

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # while starting: unwinds start(), which stops what it started

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)
    cluster = LocalCluster(
        cfg,
        preset=args.preset,
        config_file=args.config,
        overrides=args.overrides,
        num_shards=args.shards,
        replicas=args.replicas,
        namespace=args.namespace or cfg.cluster.namespace,
        host=args.host,
        log_dir=args.log_dir,
        startup_timeout_s=args.startup_timeout_s,
        keep_logs=True,
        secure=not args.no_auth,
        tls=args.tls,
    )
    if args.no_auth:
        print(
            "engram up: WARNING --no-auth: Redis has no password and the control plane is unsigned; any local "
            "process can redirect the cluster's traffic",
            file=sys.stderr,
            flush=True,
        )
    try:
        print(
            f"starting Redis and {cluster.num_shards} shards, {cluster.cfg.cluster.replicas} copies of each slot (logs in {cluster.log_dir}) ...",
            flush=True,
        )
        cluster.start()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: stop.set())
        redis = cluster.redis
        assert redis is not None and redis.proc is not None, "start() leaves a running redis-server"
        print(f"redis    {cluster.redis_url}  namespace {cluster.namespace}  pid {redis.proc.pid}")
        for shard_id, proc in sorted(cluster.shards.items()):
            print(f"shard {shard_id}  {proc.address}  pid {proc.pid}")
        sets = " ".join(f"--set {item}" for item in [*cluster.cluster_overrides, *cluster.client_overrides("admin")])
        print(f"other commands reach it with: --preset {args.preset} {sets}")
        if cluster.tls:
            c = cluster.certs
            print(
                f"TLS + roles on: CA {c['admin'].ca}; identities admin {c['admin'].cert}, train {c['train'].cert}, "
                f"read {c['read'].cert} (keys beside them, *-key.pem); the trainer takes train, workers read"
            )
        else:
            print("WARNING: --insecure: plaintext and no roles; anyone who can reach these ports can change the tables")
        print("ready; Ctrl-C stops the cluster", flush=True)
        while not stop.wait(1.0):
            for shard_id, proc in sorted(cluster.shards.items()):
                code = proc.proc.poll()
                if code is not None and not getattr(proc, "_reported", False):
                    proc._reported = True  # type: ignore[attr-defined]
                    print(f"shard {shard_id} exited with code {code}; log {proc.log_path}", file=sys.stderr, flush=True)
        return 0
    except LauncherError as exc:
        print(f"engram up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # stopping is bounded (SIGKILL after the grace period)
        print("stopping the cluster ...", flush=True)
        cluster.stop()
        print("stopped", flush=True)
