"""One traced run across processes: a training step and a worker step against real shard processes.

    python -m tests.trace_run --out docs/trace.otlp.json    # the run's trace as OTLP JSON (docs/deploy.md)

`traced_run` (used by tests/test_trace_export.py): the calling process (service `engram-run`)
opens the root span `run` and hands its context to two child processes through the TRACEPARENT
environment variable (OpenTelemetry's environment carrier):
  - `--role trainer` (service `engram-trainer`): one real `RemoteStep.train_step` (train.step >
    train.lookup / train.push) with the tables on the shards, over the trainer's sync gRPC stubs;
  - `--role worker` (service `engram-worker`): a worker-style step, `ShardClient.lookup` over
    grpc.aio (worker.step > lookup > prefetch.wait), as scripts/draw_trace.py does;
and the shards (service `engram-shard`, a LocalCluster's real processes) answer both. Context
crosses every process boundary in gRPC metadata, so all of it is one trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _attach_parent() -> object:
    """The TRACEPARENT the parent process passed, attached as the current context."""
    from opentelemetry import context, propagate

    return context.attach(propagate.extract({"traceparent": os.environ["TRACEPARENT"]}))


def _trainer(overrides: list[str]) -> None:
    import numpy as np

    from engram.config import load_config
    from engram.data import prepare_data
    from services.client.sync import SyncShardClient
    from trainer.ray_trainer import shard_model
    from trainer.remote_step import RemoteStep
    from trainer.step import build_optimizers

    cfg = load_config("tiny", None, overrides)
    _, vocab, dataset = prepare_data(cfg)
    model = shard_model(cfg, vocab.lookup)
    backbone_opt, _ = build_optimizers(model, cfg.train)
    rows = SyncShardClient.connect(cfg)
    runner = RemoteStep(
        model=model, ddp=model, shards=rows, backbone_opt=backbone_opt, cfg=cfg, rank=0, world=1, device="cpu"
    )
    try:
        x, y = dataset.batch(
            "train", batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, rng=np.random.default_rng(0)
        )  # (B, T)
        out = runner.train_step(0, x, y)
        print(f"trainer: step 1 loss {out.loss:.4f}")
    finally:
        runner.close()
        rows.close()


async def _worker(overrides: list[str]) -> None:
    import numpy as np

    from engram.config import load_config
    from services import telemetry
    from services.client import ShardClient
    from services.control.store import ControlPlane

    cfg = load_config("tiny", None, overrides)
    control = ControlPlane.from_config(cfg)
    client = await ShardClient.connect(control)
    try:
        ids = np.random.default_rng(0).integers(0, client.layout(1).num_rows, size=(2, 16, 4))  # (B, T, heads)
        with telemetry.span("worker.step", batch=2, tokens=16):
            rows = await client.lookup(1, ids)  # (B, T, heads, D)
        print(f"worker: rows {tuple(rows.shape)}")
    finally:
        await client.close()
        await control.close()


def _child(role: str, overrides: list[str]) -> int:
    from opentelemetry import context

    from services.telemetry import setup_telemetry

    tel = setup_telemetry(f"engram-{role}")
    token = _attach_parent()
    try:
        if role == "trainer":
            _trainer(overrides)
        else:
            asyncio.run(_worker(overrides))
    finally:
        context.detach(token)  # type: ignore[arg-type]
        tel.shutdown()  # flushes the spans
    return 0


def traced_run(workdir: Path, rx) -> tuple[str, list]:  # type: ignore[no-untyped-def]
    """Run it against the receiver `rx` -> (trace id, the ExportTraceServiceRequests received)."""
    from opentelemetry import propagate

    from services import telemetry
    from services.launcher import LocalCluster
    from tests.corpus import write_code_corpus

    write_code_corpus(workdir / "corpus.txt")
    overrides = [
        f'train.corpus=["{workdir / "corpus.txt"}"]',
        f"tokenizer.cache_dir={workdir / 'cache'}",
        f"train.out_dir={workdir / 'run'}",
        f"cluster.checkpoint_dir={workdir / 'shards'}",
        "train.progress=false",
        "cluster.wire_dtype=fp32",
        # lookups over gRPC carry the trace into the shards; the shm and TCP row paths have
        # client spans only (README: a real trace)
        "cluster.row_path=grpc",
    ]
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_METRICS_EXPORTER": "none"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "TRACEPARENT"}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({**clean, **otel})  # LocalCluster passes the environment to the shards
    tel = telemetry.setup_telemetry("engram-run", env={**clean, **otel})
    try:
        with LocalCluster(preset="tiny", overrides=overrides, num_shards=2, log_dir=workdir / "logs") as cluster:
            every = overrides + cluster.cluster_overrides
            with telemetry.span("run") as root:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                for role in ("trainer", "worker"):
                    r = subprocess.run(
                        [sys.executable, "-m", "tests.trace_run", "--role", role, "--overrides", json.dumps(every)],
                        cwd=ROOT,
                        env={**clean, **otel, "TRACEPARENT": carrier["traceparent"]},
                        capture_output=True,
                        text=True,
                        timeout=180,
                    )
                    if r.returncode != 0:
                        raise RuntimeError(f"{role} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
            trace_id = format(root.get_span_context().trace_id, "032x")
            tel.force_flush()
            # the shards export in batches: wait until both clients' server spans are in
            rx.wait_for(
                lambda got: (
                    {("engram-shard", "ApplyGradients"), ("engram-shard", "Lookup")}
                    <= {
                        (s.service, s.name.rsplit("/", 1)[-1])
                        for s in got
                        if s.trace_id == trace_id and s.kind == "server"
                    }
                    and sum(s.trace_id == trace_id and s.kind == "server" and s.name.endswith("/Lookup") for s in got)
                    >= sum(s.trace_id == trace_id and s.kind == "client" and s.name.endswith("/Lookup") for s in got)
                ),
                30,
            )
    finally:
        tel.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    return trace_id, rx.requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("trainer", "worker"), help="(internal) run one child process")
    parser.add_argument("--overrides", default="[]", help="(internal) JSON list of --set overrides")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "trace.otlp.json")
    args = parser.parse_args(argv)
    if args.role:
        return _child(args.role, json.loads(args.overrides))
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    from otlp_json import check_trace, to_otlp_json

    from scripts.otlp_receiver import OtlpReceiver

    with tempfile.TemporaryDirectory() as tmp, OtlpReceiver() as rx:
        trace_id, requests = traced_run(Path(tmp), rx)
    doc = to_otlp_json(requests, trace_id=trace_id)
    problems = check_trace(doc)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}: trace {trace_id}" + "".join(f"\nFAIL {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
