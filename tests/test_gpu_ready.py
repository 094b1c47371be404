"""The CPU side of GPU readiness: what can be checked without a GPU (tests/test_cuda.py has the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engram.engram_layer as engram_layer
from engram.config import ConfigError, load_config
from engram.model import EngramLM
from trainer.ray_trainer import check_dist_config, resolve_workers, shard_model
from worker.prefetch import Landed
from worker.runtime import check_and_drop_local_tables


def tiny_model(*overrides: str) -> EngramLM:
    cfg = load_config("tiny", None, list(overrides))
    torch.manual_seed(0)
    return EngramLM(cfg, np.arange(cfg.model.vocab_size) % 300)  # a compressing map: 512 raw -> 300 canonical


def test_indices_from_cpu_ids_equal_the_numpy_reference() -> None:
    """The CPU indexer == hashing in numpy + offsets + np.unique (the old device path's math)."""
    model = tiny_model()
    assert model.indexer is not None
    ids = np.random.default_rng(0).integers(0, model.cfg.model.vocab_size, size=(3, 40))
    got = model.engram_indices(torch.from_numpy(ids))
    compressed = np.arange(model.cfg.model.vocab_size)[ids] % 300
    for layer, rows in model.indexer.hasher.hash(compressed).items():  # numpy path
        rows = rows + model.indexer.layouts[layer].head_offsets
        unique, inverse = np.unique(rows, return_inverse=True)
        g_unique, g_inverse = got[layer]
        assert g_unique.device.type == "cpu" and g_inverse.device.type == "cpu"
        np.testing.assert_array_equal(g_unique.numpy(), unique)
        np.testing.assert_array_equal(g_inverse.numpy(), inverse.reshape(rows.shape))


def test_the_index_math_stays_on_the_cpu_when_the_model_moves() -> None:
    """No buffers: `model.to(device)` cannot drag the indexer's lookup tables onto a GPU."""
    model = tiny_model()
    assert model.indexer is not None and list(model.indexer.buffers()) == []
    assert "indexer.compress" not in model.state_dict()


def test_out_of_range_ids_are_a_clear_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="input ids must be in"):
        model.engram_indices(torch.tensor([[0, model.cfg.model.vocab_size]]))


def test_ids_cpu_gives_the_same_logits_as_device_ids() -> None:
    model = tiny_model().eval()
    ids = torch.randint(0, model.cfg.model.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], model(ids.clone(), ids_cpu=ids)[0])


def test_autocast_is_cuda_only_so_cpu_results_do_not_change() -> None:
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on, _ = tiny_model("train.autocast=bf16", "train.tf32=true")(ids)
        off, _ = tiny_model("train.autocast=off", "train.tf32=false")(ids)
    assert on.dtype == torch.float32 and torch.equal(on, off)
    with pytest.raises(ConfigError, match="train.autocast"):
        load_config("tiny", None, ["train.autocast=fp8"])


def test_more_gpu_workers_than_gpus_is_a_config_error() -> None:
    cfg = load_config("tiny", None, ["dist.use_gpu=true", "dist.num_workers=2"])
    with pytest.raises(ConfigError, match=r"dist.num_workers: 2 workers .* need one GPU each, but there is 1"):
        check_dist_config(cfg, gpus=1)
    assert check_dist_config(cfg, gpus=2) == 2
    with pytest.raises(ConfigError, match="dist.use_gpu: no GPU is visible"):
        check_dist_config(cfg, gpus=0)


def test_default_workers_are_one_per_gpu_or_two_on_cpu() -> None:
    gpu = load_config("tiny", None, ["dist.use_gpu=true"])
    assert gpu.dist.num_workers == 0
    assert resolve_workers(gpu, gpus=1) == 1 and resolve_workers(gpu, gpus=4) == 4
    assert resolve_workers(gpu, gpus=None) is None  # a remote cluster, not connected yet: checked later
    assert resolve_workers(load_config("tiny"), gpus=0) == 2


def test_gpu_workers_are_counted_on_the_connected_ray_cluster() -> None:
    """The driver asks Ray's cluster resources: 2 GPU workers on a 1-GPU cluster fail at once, no hang."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a declared (fake) GPU
    try:
        with pytest.raises(ConfigError, match="but there is 1"):
            check_dist_config(load_config("tiny", None, ["dist.use_gpu=true", "dist.num_workers=2"]))
        assert check_dist_config(load_config("tiny", None, ["dist.use_gpu=true"])) == 1
    finally:
        ray.shutdown()


def test_remote_table_workers_build_no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """shard_model never initialises a row (at `small` that was ~35 s and 200 MB per worker)."""
    cfg = load_config("small")

    def no_rows(**_: object) -> np.ndarray:
        raise AssertionError("a remote-table worker initialised table rows")

    monkeypatch.setattr(engram_layer, "init_rows", no_rows)
    model = shard_model(cfg, np.arange(cfg.model.vocab_size))
    assert len(model.tables) == 0 and model.indexer is not None
    dense = sum(p.numel() for p in model.parameters())
    assert dense == sum(p.numel() for p in model.dense_parameters())
    assert dense < 60_000_000  # the dense `small` model; its two tables alone hold ~205M parameters


def test_dropping_local_tables_waits_for_the_landed_copy() -> None:
    """check_and_drop_local_tables reads landed rows only after their copy event completed."""
    model = tiny_model()
    order: list[str] = []

    class Event:
        def synchronize(self) -> None:
            order.append("synchronize")

    class Source:
        def issue(self, unique):  # type: ignore[no-untyped-def]
            import concurrent.futures as cf

            out = {}
            for layer, ids in unique.items():
                fut: cf.Future = cf.Future()
                rows = model.tables[str(layer)].weight.detach()[ids]
                fut.set_result(Landed(ReadLogged(rows, order), Event()))
                out[layer] = fut
            return out

    assert check_and_drop_local_tables(model, Source()) == []  # type: ignore[arg-type]
    assert order and order[0] == "synchronize" and order.count("read") == order.count("synchronize")
    assert all(a == "synchronize" and b == "read" for a, b in zip(order[::2], order[1::2]))


class ReadLogged:
    """Stands for landed device rows: logs when they are read."""

    def __init__(self, rows: torch.Tensor, order: list[str]) -> None:
        self.rows, self.order = rows, order

    def float(self) -> torch.Tensor:
        self.order.append("read")
        return self.rows.float()


def test_dependency_floors_match_what_the_generated_proto_code_checks() -> None:
    """An image with an older protobuf/grpcio must fail at `pip install`, not at the first import."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = {
        m.group(1): tuple(map(int, m.group(2).split("."))) for d in deps if (m := re.match(r"([a-z-]+)>=([\d.]+)", d))
    }
    need: dict[str, tuple[int, ...]] = {}
    for f in root.glob("proto/**/*_pb2.py"):
        v = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)",
            f.read_text(),
        )
        assert v, f"{f}: no runtime version check found"
        need["protobuf"] = max(need.get("protobuf", ()), tuple(map(int, v.groups())))
    for f in root.glob("proto/**/*_pb2_grpc.py"):
        g = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", f.read_text())
        assert g, f"{f}: no GRPC_GENERATED_VERSION"
        need["grpcio"] = max(need.get("grpcio", ()), tuple(map(int, g.group(1).split("."))))
    assert set(need) == {"protobuf", "grpcio"}
    for pkg, version in need.items():
        assert floor.get(pkg, ()) >= version, f"pyproject: {pkg}>= must be at least {version} (generated code)"
    assert floor["grpcio-health-checking"] >= need["grpcio"]
