"""Part 1 of the serve benchmark (benchmarks/serve.py): decode with the KV cache against the full-window engine.

In process, same model, same prompts, interleaved A B A B, medians of `reps`: the KV-cache engine
(`worker.scheduler`: paged KV cache, continuous batching, one new token per sequence per step)
against the previous engine (`worker.engine.ModelEngine`: a full-window forward for every new
token, batched). Speed-up = new tokens/s over old tokens/s; both must give the same greedy tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def kv_speedup(checkpoint: Path, *, batch: int, prompt: int, new_tokens: int, reps: int) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from engram.checkpoint import load_model
    from worker.engine import ModelEngine, Work
    from worker.prefetch import LocalRowSource, PrefetchPipeline
    from worker.scheduler import Scheduler
    from worker.sequence import EngramOptions, SamplingParams, Sequence

    model, cfg, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.get_vocab_size(), (prompt,), generator=gen).tolist() for _ in range(batch)]
    engine = ModelEngine(model, cfg, num_tokens=tok.get_vocab_size())

    def old() -> tuple[float, list[list[int]]]:
        seqs = [list(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = engine.logprobs([Work(ids=s[-cfg.model.max_seq_len :], last_only=True) for s in seqs])
            for s, lp in zip(seqs, out):
                s.append(int(lp.argmax()))
        return time.perf_counter() - t0, [s[prompt:] for s in seqs]

    def new() -> tuple[float, list[list[int]]]:
        async def run() -> tuple[float, list[list[int]]]:
            ex = cf.ThreadPoolExecutor(1)
            sched = Scheduler(
                model,
                pipeline=PrefetchPipeline(model, LocalRowSource(model)),
                num_tokens=tok.get_vocab_size(),
                eot=None,
                executor=ex,
                kv_cache_mb=64,
                block_size=16,
                max_step_tokens=4096,
                max_running=batch,
                max_queue=batch,
            )
            sched.start()
            loop = asyncio.get_running_loop()
            seqs = [
                Sequence(
                    prompt_ids=p,
                    tok=tok,
                    loop=loop,
                    options=EngramOptions(),
                    params=SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eot=True),
                )
                for p in prompts
            ]
            t0 = time.perf_counter()
            for s in seqs:
                sched.submit(s)
            outs = []
            for s in seqs:
                toks = []
                while True:
                    ev = await s.events.get()
                    toks.append(ev.token_id)  # type: ignore[union-attr]
                    if ev.finish_reason:  # type: ignore[union-attr]
                        break
                outs.append(toks)
            dt = time.perf_counter() - t0
            await sched.close()
            ex.shutdown()
            return dt, outs

        return asyncio.run(run())

    times: dict[str, list[float]] = {"full-window (previous engine)": [], "kv-cache (scheduler)": []}
    same = True
    for _ in range(reps):  # interleaved: A B A B ...
        t_old, o_old = old()
        t_new, o_new = new()
        times["full-window (previous engine)"].append(t_old)
        times["kv-cache (scheduler)"].append(t_new)
        same = same and o_old == o_new
    tok_s = {k: batch * new_tokens / statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "reps": reps,
        "tokens_per_s": tok_s,
        "seconds": times,
        "same_greedy_tokens": same,
        "speedup": tok_s["kv-cache (scheduler)"] / tok_s["full-window (previous engine)"],
    }
