"""WorkerConfig validation and the serving overrides of a trained checkpoint's config."""

from __future__ import annotations

import pytest

from engram.config import ConfigError, load_config
from worker.runtime import with_overrides


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("worker.row_source=disk", "worker.row_source"),
        ("worker.cache_mb=-1", "worker.cache_mb"),
        ("worker.max_batch=0", "worker.max_batch"),
        ("worker.batch_timeout_ms=-1", "worker.batch_timeout_ms"),
        ("worker.max_new_tokens=0", "worker.max_new_tokens"),
        ("worker.port=70000", "worker.port"),
    ],
)
def test_bad_worker_fields_are_named(override, field) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", None, [override])


def test_serving_overrides_touch_only_worker_and_cluster() -> None:
    cfg = load_config("tiny", None, ["model.n_layer=3"])
    served = with_overrides(cfg, ["worker.row_source=remote", "cluster.wire_dtype=fp32", "worker.max_batch=3"])
    assert served.model == cfg.model and served.engram == cfg.engram
    assert (served.worker.row_source, served.cluster.wire_dtype, served.worker.max_batch) == ("remote", "fp32", 3)
    with pytest.raises(ConfigError, match=r"model\.n_layer: a trained checkpoint fixes the model"):
        with_overrides(cfg, ["model.n_layer=2"])
    with pytest.raises(ConfigError, match="worker.max_batch"):
        with_overrides(cfg, ["worker.max_batch=-2"])
