"""Checks of a whole config tree: `validate` fails fast with a `ConfigError` naming the offending field.

Every enumeration (a Literal-typed field) is checked in one place, `check_choices`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, get_args, get_origin, get_type_hints

from engram.config_schema import ROW_FORMATS, Config, ConfigError, SecurityConfig

_ROW_WIDTH = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8.25}  # bits per value (fp8: + one scale byte per 32)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")


@functools.cache
def _choices(cls: Any) -> dict[str, tuple[Any, ...]]:
    """field -> allowed values, for the Literal-typed fields of a config section."""
    return {name: get_args(hint) for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal}


def check_choices(cfg: Config) -> None:
    """Every enumeration (a Literal-typed field) holds one of its values."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for name, allowed in _choices(values.__class__).items():
            value = getattr(values, name)
            if value not in allowed:
                raise ConfigError(
                    f"{section.name}.{name}: unknown {value!r} "
                    f"({', '.join(repr(a) if a == '' else str(a) for a in allowed)})"
                )


def validate(cfg: Config) -> None:
    m, e, t, c = cfg.model, cfg.engram, cfg.train, cfg.cluster
    for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "hc_mult"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_head or (m.d_model // m.n_head) % 2:
        raise ConfigError(f"model.d_model: {m.d_model} must split into n_head={m.n_head} even-sized heads")
    if m.mlp_hidden < 0:
        raise ConfigError(f"model.mlp_hidden: must be >= 0, got {m.mlp_hidden}")
    if m.ffn == "moe":
        raise ConfigError(
            "model.ffn: 'moe' is reserved for a mixture-of-experts backbone (the paper's iso-parameter, "
            "iso-FLOP comparison) but is not implemented; use 'dense'"
        )
    check_choices(cfg)
    _positive("tokenizer.vocab_size", cfg.tokenizer.vocab_size)
    if cfg.tokenizer.clean_up_tokenization_spaces not in (None, True, False):
        raise ConfigError(
            "tokenizer.clean_up_tokenization_spaces: expected true, false or null, got "
            f"{cfg.tokenizer.clean_up_tokenization_spaces!r}"
        )
    if cfg.tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"tokenizer.vocab_size: {cfg.tokenizer.vocab_size} exceeds model.vocab_size={m.vocab_size}")
    if e.enabled:
        if not e.layer_ids:
            raise ConfigError("engram.layer_ids: empty; set engram.enabled=false for a baseline")
        if len(set(e.layer_ids)) != len(e.layer_ids):
            raise ConfigError(f"engram.layer_ids: duplicate layers in {e.layer_ids}")
        for layer in e.layer_ids:
            if layer == 0:
                raise ConfigError(
                    "engram.layer_ids: Engram cannot be at layer 0 (nothing runs before it to hide the lookup)"
                )
            if not 0 < layer < m.n_layer:
                raise ConfigError(f"engram.layer_ids: layer {layer} is outside 1..{m.n_layer - 1}")
        if e.max_ngram_size < 2:
            raise ConfigError(f"engram.max_ngram_size: must be >= 2, got {e.max_ngram_size}")
        for name in ("n_head_per_ngram", "n_embed_per_ngram", "kernel_size", "init_std"):
            _positive(f"engram.{name}", getattr(e, name))
        if e.n_embed_per_ngram % e.n_head_per_ngram:
            raise ConfigError(
                f"engram.n_embed_per_ngram: {e.n_embed_per_ngram} not divisible by "
                f"n_head_per_ngram={e.n_head_per_ngram}"
            )
        if len(e.table_size_per_ngram) != e.max_ngram_size - 1:
            raise ConfigError(
                f"engram.table_size_per_ngram: needs {e.max_ngram_size - 1} entries (one per order 2.."
                f"{e.max_ngram_size}), got {len(e.table_size_per_ngram)}"
            )
        for size in e.table_size_per_ngram:
            if not isinstance(size, int) or size <= 1:
                raise ConfigError(f"engram.table_size_per_ngram: sizes must be integers > 1, got {size!r}")
        if e.row_format == "fp8" and (e.n_embed_per_ngram // e.n_head_per_ngram) % 32:
            raise ConfigError(
                f"engram.row_format: fp8 needs dims per head ({e.n_embed_per_ngram // e.n_head_per_ngram}) "
                "to be a multiple of the 32-value scale block"
            )
        if (
            isinstance(e.compressed_vocab_size, bool)
            or not isinstance(e.compressed_vocab_size, int)
            or e.compressed_vocab_size < 0
        ):
            raise ConfigError(f"engram.compressed_vocab_size: must be an integer >= 0, got {e.compressed_vocab_size!r}")
        if e.key_norm_eps is not None and (
            isinstance(e.key_norm_eps, bool) or not isinstance(e.key_norm_eps, (int, float)) or e.key_norm_eps <= 0
        ):
            raise ConfigError(f"engram.key_norm_eps: must be null or a positive number, got {e.key_norm_eps!r}")
        if not 0 <= e.pad_id < m.vocab_size:
            raise ConfigError(f"engram.pad_id: {e.pad_id} is outside the vocabulary 0..{m.vocab_size - 1}")
    for name in ("seq_len", "batch_size", "steps", "lr", "eval_every", "eval_batches", "max_corpus_mb"):
        _positive(f"train.{name}", getattr(t, name))
    if isinstance(t.grad_accum, bool) or not isinstance(t.grad_accum, int) or t.grad_accum < 1:
        raise ConfigError(f"train.grad_accum: must be an integer >= 1, got {t.grad_accum!r}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.grad_accum: the batch of {t.batch_size} does not split evenly into {t.grad_accum} micro-batches"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0 < t.val_fraction < 1:
        raise ConfigError(f"train.val_fraction: must be in (0, 1), got {t.val_fraction}")
    if t.engram_lr_mult <= 0:
        raise ConfigError(f"train.engram_lr_mult: must be positive, got {t.engram_lr_mult}")
    if t.weight_decay < 0 or t.warmup_steps < 0 or t.checkpoint_every < 0 or t.grad_clip < 0:
        raise ConfigError("train.weight_decay/warmup_steps/checkpoint_every/grad_clip: must be >= 0")
    for name in (
        "num_shards",
        "num_slots",
        "heartbeat_s",
        "heartbeat_ttl_s",
        "lookup_timeout_s",
        "max_message_mb",
        "max_step_jump",
        "max_epoch_jump",
        "max_step_parts",
        "pending_step_timeout_s",
        "freeze_lease_s",
        "migrate_timeout_s",
        "inflight_mb",
        "max_concurrent_rpcs",
        "keepalive_s",
        "idle_connection_s",
        "replicas",
        "failover_check_s",
        "replica_switch_s",
        "pending_wait_s",
    ):
        _positive(f"cluster.{name}", getattr(c, name))
    if c.replicas > c.num_shards:
        raise ConfigError(
            f"cluster.replicas: {c.replicas} copies of each slot need as many shards (num_shards {c.num_shards})"
        )
    for name in ("shard_threads", "shard_torch_threads", "shard_grace_s"):
        if getattr(c, name) < 0:
            raise ConfigError(f"cluster.{name}: must be >= 0, got {getattr(c, name)!r}")
    if c.num_shards > c.num_slots:
        raise ConfigError(f"cluster.num_shards: {c.num_shards} shards need at least as many slots ({c.num_slots})")
    stored = _ROW_WIDTH.get(e.row_format, 32)
    if _ROW_WIDTH[c.wire_dtype] > stored:
        allowed = ", ".join(f for f in ROW_FORMATS if _ROW_WIDTH[f] <= stored)
        raise ConfigError(
            f"cluster.wire_dtype: {c.wire_dtype} rows are wider than the tables' storage format "
            f"engram.row_format={e.row_format}; a lookup may ask only for {allowed}"
        )
    if not 0 <= c.base_port < 65536:
        raise ConfigError(f"cluster.base_port: {c.base_port} is not a TCP port")
    if not 0 <= c.data_port < 65536:
        raise ConfigError(f"cluster.data_port: {c.data_port} is not a TCP port")
    if not isinstance(c.host_id, str) or any(ch.isspace() for ch in c.host_id):
        raise ConfigError(f"cluster.host_id: expected a name without spaces, got {c.host_id!r}")
    if not c.shm_dir:
        raise ConfigError("cluster.shm_dir: empty (a directory on a tmpfs, e.g. /dev/shm)")
    for name in ("redis_username", "redis_password_file", "redis_ca_file", "cluster_key_file"):
        value = getattr(cfg.security, name)
        if not isinstance(value, str) or not value.isprintable() or (name == "redis_username" and " " in value):
            raise ConfigError(
                f"security.{name}: expected a {'name' if name == 'redis_username' else 'path'}, got {value!r}"
            )
    d = cfg.dist
    _positive("dist.step_timeout_s", d.step_timeout_s)
    if isinstance(d.staleness, bool) or not isinstance(d.staleness, int) or d.staleness < 0:
        raise ConfigError(f"dist.staleness: must be an integer >= 0, got {d.staleness!r}")
    if isinstance(d.num_workers, bool) or not isinstance(d.num_workers, int) or d.num_workers < 0:
        raise ConfigError(f"dist.num_workers: must be an integer >= 1 (or 0: one per GPU), got {d.num_workers!r}")
    if d.ray_address is not None and not isinstance(d.ray_address, str):
        raise ConfigError(
            f"dist.ray_address: expected a string like 'ray://host:10001' or 'auto', got {d.ray_address!r}"
        )
    w = cfg.worker
    if w.cache_mb < 0:
        raise ConfigError(f"worker.cache_mb: must be >= 0, got {w.cache_mb}")
    for name in (
        "max_batch",
        "max_new_tokens",
        "kv_cache_mb",
        "kv_block_size",
        "max_step_tokens",
        "max_running",
        "max_queue",
    ):
        _positive(f"worker.{name}", getattr(w, name))
    if not -1 <= w.http_port < 65536:
        raise ConfigError(f"worker.http_port: {w.http_port} is not a TCP port (-1 = off, 0 = a free port)")
    if not w.model_name:
        raise ConfigError("worker.model_name: empty")
    if w.batch_timeout_ms < 0:
        raise ConfigError(f"worker.batch_timeout_ms: must be >= 0, got {w.batch_timeout_ms}")
    if not 0 <= w.port < 65536:
        raise ConfigError(f"worker.port: {w.port} is not a TCP port")
    _validate_security(cfg.security)


def _validate_security(s: SecurityConfig) -> None:
    if s.tls_enabled and not (s.tls_cert and s.tls_key and s.tls_ca):
        missing = [n for n in ("tls_cert", "tls_key", "tls_ca") if not getattr(s, n)]
        raise ConfigError(
            f"security.{missing[0]}: required when security.tls_enabled is true "
            f"(missing: {', '.join('security.' + n for n in missing)})"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("security.tls_key: tls_cert and tls_key go together (a certificate and its key)")
    if s.auth_enabled and not s.tls_enabled and not s.tokens_file:
        raise ConfigError(
            "security.tokens_file: auth without TLS needs the tokens the server accepts "
            "(or set security.tls_enabled with client certificates)"
        )
