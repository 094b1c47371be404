"""Draw a real trace: one worker-style step doing a lookup through real shard processes.

    python scripts/draw_trace.py                 # -> docs/trace.png (and the spans as JSON beside it)

Same set-up as tests/test_tracing.py: an in-process OTLP/gRPC receiver (scripts/otlp_receiver.py), a LocalCluster (real
redis-server + N `python -m services.shard` processes exporting to the receiver) and this
process as the client. The step is: issue the lookup, run a stand-in for the layers before
the Engram layer (a real torch matmul in a thread, so the overlap is visible), then wait on
the handle. The picture is a waterfall of the received spans, one row per span.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from otlp_receiver import OtlpReceiver, ReceivedSpan  # noqa: E402  (scripts/, beside this file)

from services import telemetry  # noqa: E402
from services.client import ShardClient  # noqa: E402
from services.launcher import LocalCluster  # noqa: E402

COLORS = {"engram-worker": "#4C72B0", "engram-shard": "#DD8452"}


def _compute(ms: float) -> None:
    a = torch.randn(512, 512)
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        a = torch.tanh(a @ a.T / 512)


async def one_step(cluster: LocalCluster, shape: tuple[int, ...], compute_ms: float) -> str:
    control = cluster.control()
    client = await ShardClient.connect(control)
    try:
        layout = client.layout(1)
        rng = np.random.default_rng(0)
        await client.lookup(1, rng.integers(0, layout.num_rows, size=64))  # warm the channels (own trace)
        ids = rng.integers(0, layout.num_rows, size=shape)  # (B, T, heads) hashed ids
        with telemetry.span("worker.step", batch=shape[0], tokens=shape[1]) as step:
            handle = client.lookup(1, ids)  # prefetch: the requests leave now
            with telemetry.span("layers 0..l-1 (stand-in matmul, in a thread)"):
                # off the event loop, as a CPU worker must: on the loop it would hold the requests
                # back until it yields (the trace then shows the RPCs starting after the compute)
                await asyncio.to_thread(_compute, compute_ms)
            rows = await handle  # (B, T, heads, D)
            step.set_attribute("engram.rows_shape", str(tuple(rows.shape)))
        return format(step.get_span_context().trace_id, "032x")
    finally:
        await client.close()
        await control.close()


def tree_order(spans: list[ReceivedSpan]) -> list[tuple[int, ReceivedSpan]]:
    children: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_span_id, []).append(s)
    out: list[tuple[int, ReceivedSpan]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_ns):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk("", 0)
    return out


def draw(spans: list[ReceivedSpan], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = tree_order(spans)
    t0 = min(s.start_ns for s in spans)
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) + 1.6))
    for i, (depth, s) in enumerate(rows):
        start, dur = (s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6
        ax.barh(i, max(dur, 0.02), left=start, color=COLORS.get(s.service, "#55A868"), height=0.6)
        name = s.name.replace("/engram.shard.v1.MemoryShard/", "rpc ")
        label = f"{'  ' * depth}{name}  [{s.service}{' pid ' + str(s.pid) if s.kind == 'server' else ''}]"
        ax.text(-0.01, i, label, ha="right", va="center", fontsize=9, transform=ax.get_yaxis_transform())
        extra = f"  {dur:.2f} ms"
        if "engram.rows" in s.attributes and s.kind == "server":
            extra += f"  rows={s.attributes['engram.rows']} bytes_out={s.attributes.get('engram.bytes_out')}"
        ax.text(start + max(dur, 0.02), i, extra, va="center", fontsize=8)
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step started")
    ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    right = max((s.end_ns - t0) / 1e6 for s in spans)
    ax.set_xlim(0, right * 1.35)
    fig.subplots_adjust(left=0.36, right=0.98, top=0.9, bottom=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "trace.png")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--compute-ms", type=float, default=20.0, help="length of the stand-in layers")
    args = parser.parse_args(argv)
    with OtlpReceiver() as rx:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint  # inherited by the shard processes
        os.environ.pop("OTEL_SERVICE_NAME", None)
        os.environ["OTEL_METRICS_EXPORTER"] = "none"
        tel = telemetry.setup_telemetry("engram-worker")
        try:
            with LocalCluster(preset=args.preset, num_shards=args.shards) as cluster:
                trace_id = asyncio.run(one_step(cluster, (8, 64, 4), args.compute_ms))
                tel.force_flush()
                want = args.shards
                spans = rx.wait_for(
                    lambda got: sum(s.trace_id == trace_id and s.kind == "server" for s in got) >= want, timeout_s=30
                )
        finally:
            tel.shutdown()
    trace = [s for s in spans if s.trace_id == trace_id]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"One step's trace, received over OTLP from {len({s.pid for s in trace})} processes "
        f"(preset {args.preset}, {args.shards} shards, ids (8, 64, 4); {time.strftime('%Y-%m-%d')})"
    )
    draw(trace, args.out, title)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(s) for s in trace], indent=1))
    print(f"wrote {args.out} ({len(trace)} spans, trace {trace_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
