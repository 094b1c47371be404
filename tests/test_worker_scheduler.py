"""The generation engine in process: continuous batching over the KV cache equals the full forward,
with the model's local tables and with rows from real shard processes; preemption; cancel."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engram.checkpoint import load_model
from engram.config import load_config
from engram.model import EngramLM
from tests.fixtures_procs import cluster_fixture
from tests.worker_proc import shared_tiny_checkpoint
from worker.prefetch import LocalRowSource, PrefetchPipeline
from worker.runtime import remote_source
from worker.scheduler import Overloaded, Scheduler
from worker.sequence import EngramOptions, ErrorEvent, SamplingParams, Sequence, TokenEvent

cluster = cluster_fixture(num_shards=2, overrides=[])
pytestmark = pytest.mark.timeout(120)


def randomise_conv(model: EngramLM) -> EngramLM:
    with torch.no_grad():  # zero-init convs would hide a wrong conv state
        for block in model.blocks:
            if block.engram is not None:
                block.engram.short_conv.conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


async def generate(
    sched: Scheduler, tok: Tokenizer, prompts: list[list[int]], *, max_tokens: int, **kw
) -> list[list[TokenEvent]]:
    loop = asyncio.get_running_loop()
    seqs = [
        Sequence(
            prompt_ids=p,
            tok=tok,
            loop=loop,
            options=EngramOptions(),
            params=SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eot=True, **kw),
        )
        for p in prompts
    ]
    for s in seqs:
        sched.submit(s)

    async def drain(s: Sequence) -> list[TokenEvent]:
        out = []
        while True:
            ev = await asyncio.wait_for(s.events.get(), 60)
            assert not isinstance(ev, ErrorEvent), ev.message
            out.append(ev)
            if ev.finish_reason:
                return out

    return await asyncio.gather(*(drain(s) for s in seqs))


def check_against_full_forward(
    model: EngramLM, num_tokens: int, prompt: list[int], *, events: list[TokenEvent], tol: float
) -> None:
    ids = list(prompt)
    for ev in events:
        with torch.no_grad():
            logp = torch.log_softmax(
                model(torch.tensor([ids[-model.cfg.model.max_seq_len :]]))[0][0, -1, :num_tokens], -1
            )
        assert ev.token_id == int(logp.argmax())
        top = torch.topk(logp, 5)
        assert [i for i, _ in ev.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in ev.top_logprobs]), top.values, rtol=tol, atol=tol)
        ids.append(ev.token_id)


def run_engine(model: EngramLM, source, tok: Tokenizer, *, prompts, max_tokens: int, **sched_kw):
    async def main():
        ex = cf.ThreadPoolExecutor(1)
        pipe = PrefetchPipeline(model, source) if model.indexer is not None else None
        kw = dict(kv_cache_mb=1.0, block_size=8, max_step_tokens=24, max_running=8, max_queue=16) | sched_kw
        sched = Scheduler(model, pipeline=pipe, num_tokens=tok.get_vocab_size(), eot=None, executor=ex, **kw)
        sched.start()
        try:
            out = await generate(sched, tok, prompts, max_tokens=max_tokens)
            await asyncio.sleep(0.05)
            return out, sched.stats()
        finally:
            await sched.close()
            ex.shutdown()
            if pipe is not None:
                pipe.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def trained():
    model, cfg, tok_json = load_model(shared_tiny_checkpoint())
    return randomise_conv(model.eval()), Tokenizer.from_str(tok_json)


def test_batched_decode_with_local_tables_equals_the_full_forward(trained) -> None:
    model, tok = trained
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.get_vocab_size(), (n,), generator=gen).tolist() for n in (3, 40, 9, 1, 17)]
    events, stats = run_engine(model, LocalRowSource(model), tok, prompts=prompts, max_tokens=14)
    for p, evs in zip(prompts, events):
        assert len(evs) == 14 and evs[-1].finish_reason == "length"
        check_against_full_forward(model, tok.get_vocab_size(), p, events=evs, tol=1e-5)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["finished"] == 5
    # every prompt token and every generated token but the last went through the model once
    assert stats["prefill_tokens"] + stats["decode_tokens"] == sum(map(len, prompts)) + 5 * 13
    assert stats["steps"] >= 40 // 24 + 14  # the 40-token prompt went in chunks of <= 24 tokens


def test_preemption_under_a_small_pool_keeps_outputs_exact(trained) -> None:
    model, tok = trained
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(6)]
    # 64 KiB holds 16 blocks of 8 positions (tiny: 2 layers, d_model 32): fewer than 6 sequences of 30 need
    events, stats = run_engine(model, LocalRowSource(model), tok, prompts=prompts, max_tokens=25, kv_cache_mb=0.0625)
    assert stats["preemptions"] > 0
    for p, evs in zip(prompts, events):
        check_against_full_forward(model, tok.get_vocab_size(), p, events=evs, tol=1e-5)


def test_context_shift_past_max_seq_len(trained) -> None:
    model, tok = trained
    events, _ = run_engine(model, LocalRowSource(model), tok, prompts=[[7, 8, 9]], max_tokens=80)
    assert len(events[0]) == 80  # 83 tokens > max_seq_len=64: the window shifted once


@torch.no_grad()
def test_decode_with_remote_rows_equals_the_full_forward(cluster) -> None:
    cfg = load_config(
        "tiny", None, [*cluster.cluster_overrides, *cluster.client_overrides("read"), "cluster.wire_dtype=fp32"]
    )  # a worker: the read identity
    model = randomise_conv(EngramLM(cfg, np.arange(cfg.model.vocab_size)).eval())  # fresh tables == the cluster's
    _, _, tok_json = load_model(shared_tiny_checkpoint())
    tok = Tokenizer.from_str(tok_json)
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7], list(range(20, 50))]
    events, stats = run_engine(model, remote_source(cfg, torch.device("cpu")), tok, prompts=prompts, max_tokens=10)
    for p, evs in zip(prompts, events):
        check_against_full_forward(model, tok.get_vocab_size(), p, events=evs, tol=1e-5)
    assert stats["kv_blocks_used"] == 0


def test_queue_limit_and_cancel_free_blocks(trained) -> None:
    model, tok = trained

    async def main():
        ex = cf.ThreadPoolExecutor(1)
        sched = Scheduler(
            model,
            pipeline=PrefetchPipeline(model, LocalRowSource(model)),
            num_tokens=tok.get_vocab_size(),
            eot=None,
            executor=ex,
            kv_cache_mb=1.0,
            block_size=8,
            max_step_tokens=64,
            max_running=1,
            max_queue=1,
        )
        sched.start()
        loop = asyncio.get_running_loop()

        def mk() -> Sequence:
            return Sequence(
                prompt_ids=[1, 2, 3],
                tok=tok,
                loop=loop,
                options=EngramOptions(),
                params=SamplingParams(max_tokens=500, temperature=0, ignore_eot=True),
            )

        a, b = mk(), mk()
        sched.submit(a)
        await asyncio.wait_for(a.events.get(), 30)  # a runs
        sched.submit(b)  # b waits (max_running=1)
        with pytest.raises(Overloaded, match="worker.max_queue=1"):
            sched.submit(mk())
        assert sched.stats()["kv_blocks_used"] > 0
        sched.cancel(a)
        sched.cancel(b)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if sched.stats()["kv_blocks_used"] == 0 and not sched.running and not sched.waiting:
                break
        st = sched.stats()
        await sched.close()
        ex.shutdown()
        return st

    st = asyncio.run(main())
    assert st["kv_blocks_used"] == 0 and st["cancelled"] == 2


def test_train_sample_uses_the_kv_cache_and_seeded_nucleus_sampling() -> None:
    from worker.sample import sample_from_checkpoint

    ck = shared_tiny_checkpoint()
    model, cfg, tok_json = load_model(ck)
    tok = Tokenizer.from_str(tok_json)
    ids, new = tok.encode("def f", add_special_tokens=False).ids, []
    for _ in range(30):  # greedy over the full window, the old way
        with torch.no_grad():
            new.append(int(model(torch.tensor([ids + new]))[0][0, -1, : tok.get_vocab_size()].argmax()))
    assert sample_from_checkpoint(str(ck), "def f", max_new_tokens=30, temperature=0) == tok.decode(new)
    a = sample_from_checkpoint(str(ck), "def f", max_new_tokens=30)  # default: temperature 0.8, top_p 0.95, seed 0
    assert a == sample_from_checkpoint(str(ck), "def f", max_new_tokens=30)
    assert a != sample_from_checkpoint(str(ck), "def f", max_new_tokens=30, seed=1)
