"""`engram train` -> `engram cluster load` -> `engram serve` (remote rows) gives the trained model's logits."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from tokenizers import Tokenizer

from engram.checkpoint import load_model
from proto.worker.v1 import worker_pb2 as pb
from proto.worker.v1 import worker_pb2_grpc
from services.client.table_load import checkpoint_tables, write_table_slots
from tests import fixtures_tls
from tests.fixtures_procs import cluster_fixture
from tests.worker_proc import ROOT, WorkerProcess, shared_tiny_checkpoint

cluster = cluster_fixture(num_shards=2, overrides=[])
pytestmark = pytest.mark.timeout(180)


def test_load_then_serve_gives_the_trained_logits(cluster, tmp_path) -> None:
    ck = shared_tiny_checkpoint()
    sets = [f"--set={o}" for o in cluster.cluster_overrides]
    admin = [f"--set={o}" for o in cluster.client_overrides("admin")]  # the CLI restores: admin
    read = [f"--set={o}" for o in cluster.client_overrides("read")]  # a worker reads rows: read
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_cli.main",
            "cluster",
            "load",
            str(ck),
            "--preset",
            "tiny",
            *sets,
            *admin,
            "--name",
            "slots",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "16 slots restored" in out.stdout and "(0 slot files reused)" in out.stdout  # tiny: 16 slots, 2 shards
    worker = WorkerProcess(
        ck, *sets, *read, "--set=worker.row_source=remote", "--set=cluster.wire_dtype=fp32", "--set=worker.http_port=0"
    ).start()
    try:
        assert "differ" not in worker.stderr()  # the shards hold the checkpoint's rows now
        model, _, tok_json = load_model(ck)
        tok = Tokenizer.from_str(tok_json)
        text = "def function_3(self, value):\n    return value + 1"
        ids = tok.encode(text).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :, : tok.get_vocab_size()], -1)  # (T, V)
        expected = logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        with fixtures_tls.channel(worker.address, "read") as ch:  # the worker serves mTLS with roles too
            reply = worker_pb2_grpc.ModelWorkerStub(ch).Score(pb.ScoreRequest(text=text), timeout=60)
        torch.testing.assert_close(torch.tensor(list(reply.logprobs)), expected, rtol=0, atol=1e-6)
        assert worker.base_url.startswith("https://")
        r = httpx.post(
            f"{worker.base_url}/v1/completions",
            timeout=60,
            verify=fixtures_tls.ssl_context("read"),
            json={
                "model": "engram",
                "prompt": text,
                "max_tokens": 5,
                "temperature": 0,
                "logprobs": 0,
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200, r.text
        new = []
        for lp in r.json()["choices"][0]["logprobs"]["token_logprobs"]:  # generation on remote rows, KV cache
            with torch.no_grad():
                step = torch.log_softmax(model(torch.tensor([ids + new]))[0][0, -1, : tok.get_vocab_size()], -1)
            new.append(int(step.argmax()))
            assert lp == pytest.approx(float(step.max()), abs=1e-5)
    finally:
        worker.kill()


def test_slot_files_resume_after_an_interruption(cluster, tmp_path) -> None:
    from engram.config import config_from_dict
    from engram.layout import table_layouts

    cfg_dict, tables, step = checkpoint_tables(shared_tiny_checkpoint())
    layouts = table_layouts(config_from_dict(cfg_dict).engram)
    seen: list[tuple[int, int, bool]] = []

    def stop_after_5(table: int, slot: int, skipped: bool) -> None:
        seen.append((table, slot, skipped))
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_table_slots(
            tables,
            layouts,
            directory=tmp_path,
            name="resume",
            num_slots=16,
            kind="adam",
            step=step,
            on_slot=stop_after_5,
        )
    seen.clear()
    manifest = write_table_slots(
        tables,
        layouts,
        directory=tmp_path,
        name="resume",
        num_slots=16,
        kind="adam",
        step=step,
        on_slot=lambda t, s, k: seen.append((t, s, k)),
    )
    assert [k for _, _, k in seen] == [True] * 5 + [False] * 11 and len(manifest["files"]) == 16
    with open(tmp_path / "table1" / "slot00003.bin", "rb") as f:  # rows 3, 19, 35, ... of table 1
        f.seek(48)
        first = torch.frombuffer(bytearray(f.read(4 * 8)), dtype=torch.float32)
    torch.testing.assert_close(first, tables[1][3].float(), rtol=0, atol=0)
