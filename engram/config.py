"""One typed config tree for the whole system.

A run is described by a `Config`: a preset (`tiny`, `cpu`, `small`, `paper27b`, `paper40b`,
`v41flash`) optionally
merged with a JSON/TOML file and `section.field=value` overrides from the command line.
`validate()` fails fast with a `ConfigError` naming the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

# Enumerations: a field's type names its choices; `validate` checks every Literal field in one place.
RowFormat = Literal["fp32", "bf16", "fp16", "fp8"]  # the codecs are in engram/row_format.py
RowPath = Literal["auto", "shm", "tcp", "grpc"]
WireDtype = Literal["fp32", "bf16", "fp16", "fp8"]  # fp8 only from fp8 tables (validate)
RowMirror = Literal["", "bf16", "fp16"]
Optimizer = Literal["adam", "adagrad"]
Autocast = Literal["bf16", "off"]
Ffn = Literal["dense", "moe"]
DistMode = Literal["sync", "async"]
RowSource = Literal["local", "remote"]
ROW_PATHS: tuple[str, ...] = get_args(RowPath)
ROW_FORMATS: tuple[str, ...] = get_args(RowFormat)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


_ROW_WIDTH = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8.25}  # bits per value (fp8: + one scale byte per 32)


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    path: str | None = None  # a tokenizer.json to load; None trains a byte-level BPE on the corpus
    vocab_size: int = 4096  # BPE vocabulary when training; an upper bound when loading
    cache_dir: str = ".cache/engram"
    # transformers' decode rewrites " ." -> "." etc. when this is true; None -> the value in the
    # tokenizer_config.json beside tokenizer.path (transformers' default False when absent)
    clean_up_tokenization_spaces: bool | None = None


@dataclass(kw_only=True, slots=True)
class EngramConfig:
    enabled: bool = True
    layer_ids: list[int] = field(default_factory=lambda: [1])
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    n_embed_per_ngram: int = 512  # dims per n-gram order; each head gets n_embed_per_ngram // n_head
    table_size_per_ngram: list[int] = field(default_factory=lambda: [5 * 129280, 5 * 129280])
    kernel_size: int = 4
    pad_id: int = 2  # raw tokenizer id used before the sequence start (mapped through compression)
    seed: int = 0
    init_std: float = 1.0  # N(0, init_std) rows, like nn.Embedding's default
    row_format: RowFormat = "fp32"  # storage format of the tables: fp32 | bf16 | fp16 | fp8 (E4M3 + UE8M0 per 32)
    compressed_vocab_size: int = 0  # |V'| the layout was built for (the multipliers depend on it); 0 -> any
    # eps of the gate's key/query RMSNorms; None -> torch's default, machine epsilon of the dtype, as the demo
    key_norm_eps: float | None = None
    # ablations (the paper's Table 4 switches), each named after what it does
    gate: bool = True  # false -> alpha = 1: the value is added ungated
    short_conv: bool = True  # false -> Y = alpha * v, no causal depthwise conv
    compress_vocab: bool = True  # false -> hash raw token ids (|V'| = |V|)
    shared_keys: bool = False  # true -> one key projection shared by all hyper-connection branches
    freeze_table: bool = False  # ablation: rows stay at their init; projections, gates and conv still train


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_hidden: int = 0  # 0 -> SwiGLU default of 8/3 * d_model rounded to 64
    max_seq_len: int = 256
    hc_mult: int = 1  # hyper-connection branches M >= 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    ffn: Ffn = "dense"  # feed-forward kind; only "dense" (SwiGLU) exists, "moe" is a reserved hook


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    corpus: list[str] = field(default_factory=list)  # files or folders; empty -> Python's stdlib
    max_corpus_mb: float = 8.0  # cap on the text read from the corpus
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    engram_lr_mult: float = 5.0  # paper: embeddings at 5x the backbone LR, no weight decay
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0 -> only at the end
    seed: int = 1234
    grad_accum: int = 1  # micro-batches per step: batch_size splits as over that many data-parallel workers
    device: str = "cpu"
    autocast: Autocast = "bf16"  # CUDA only: bf16 | off (fp32); CPU always runs fp32
    tf32: bool = True  # CUDA only: TF32 tensor cores for the fp32 matmuls left outside autocast
    out_dir: str = "runs/latest"
    progress: bool = True


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "engram"  # Redis key prefix, so several clusters can share one Redis
    num_shards: int = 2
    num_slots: int = 256  # fixed for the life of a cluster; slots move, rows never move one by one
    host: str = "127.0.0.1"
    base_port: int = 0  # 0 -> free ports
    wire_dtype: WireDtype = "bf16"  # fp32 | bf16 | fp16 | fp8 (from fp8 tables only)
    optimizer: Optimizer = "adam"  # adam (lazy/sparse) | adagrad (row-wise)
    checkpoint_dir: str = "runs/shards"
    heartbeat_s: float = 0.5
    heartbeat_ttl_s: float = 2.0  # a shard silent this long is dead: fenced and failed over (docs/failover.md)
    # replication (docs/failover.md): every slot on `replicas` shards, one primary + replicas - 1 copies
    replicas: int = 1
    failover_check_s: float = 0.25  # how often the failover leader reads the registry and the slot map
    replica_switch_s: float = 1.0  # a lookup unanswered this long goes to another replica of its slots
    lookup_timeout_s: float = 10.0
    max_message_mb: int = 64
    # Row data paths (see services/shard/dataplane.py and docs: consistency)
    host_id: str = ""  # this machine's id; "" -> socket.gethostname() at process entry. Shards register it;
    # a client reads rows from shared memory only when its host_id equals the shard's (set it to the
    # node name where containers on one node have different hostnames)
    shm_dir: str = "/dev/shm"  # where shards publish their tables (a tmpfs shared by shards and workers)
    row_path: RowPath = "auto"  # auto (shm on the same host, else tcp) | shm | tcp | grpc: how lookups travel
    data_port: int = 0  # the shard's TCP data-plane port; 0 -> a free port (registered next to its gRPC address)
    row_mirror: RowMirror = "bf16"  # "" (none) | bf16 | fp16: a narrow copy of the fp32 rows kept next to them
    # bounds on the state one request can create on a shard (docs/deploy.md, "Limits"):
    max_step_jump: int = 1  # an update of step s needs s <= applied_step + max_step_jump (sync/async push 1 by 1)
    max_epoch_jump: int = 16  # SetSlotMap may move a shard's epoch forward by at most this much at once
    max_step_parts: int = 1024  # num_parts of a multi-part (sync) step
    pending_step_timeout_s: float = 120.0  # a multi-part step missing parts this long is discarded
    freeze_lease_s: float = 60.0  # a MigrateSlots freeze (and a staged import) lifts this long after the stream
    migrate_timeout_s: float = 600.0  # deadline of one MigrateSlots stream to the target
    inflight_mb: int = 1024  # memory a shard spends on requests in flight; RESOURCE_EXHAUSTED beyond it
    max_concurrent_rpcs: int = 1024  # per shard; RESOURCE_EXHAUSTED beyond it
    keepalive_s: float = 30.0  # shard pings idle clients; no answer in keepalive_s/3 -> connection closed
    idle_connection_s: float = 600.0  # a connection with no call this long is closed (clients reconnect)
    # one shard process (`engram shard`; its --threads/--torch-threads/--grace-s/--pending-wait-s override these)
    shard_threads: int = 0  # worker pool; 0 -> cores + 2, at most 8
    shard_torch_threads: int = 0  # intra-op threads per gather/update; 0 -> cores // 4 (shards share cores)
    shard_grace_s: float = 5.0  # seconds in-flight calls get at shutdown
    pending_wait_s: float = 60.0  # sync mode: how long a gradient of step s+1 waits for step s (then ABORTED)


@dataclass(kw_only=True, slots=True)
class WorkerConfig:
    row_source: RowSource = "local"  # local (the model's own tables) | remote (memory shards via the cluster)
    prefetch: bool = True  # issue lookups as soon as ids are known; false -> synchronously at the layer
    cache_mb: float = 0.0  # hot-row cache on the device for frozen tables; 0 -> off
    max_batch: int = 8  # dynamic batching: most requests in one model call
    batch_timeout_ms: float = 5.0  # how long the batcher waits to fill a batch
    max_new_tokens: int = 512  # upper bound a Generate request may ask for
    port: int = 50061
    device: str = "cpu"
    # the generation engine (worker.scheduler): paged KV cache and continuous batching
    kv_cache_mb: float = 64.0  # memory budget of the KV block pool
    kv_block_size: int = 16  # positions per KV block
    max_step_tokens: int = 512  # token budget of one engine step (decode tokens + prefill chunk)
    max_running: int = 64  # sequences in the running batch at once
    max_queue: int = 128  # requests waiting for admission; beyond it new requests get 429
    http_port: int = -1  # OpenAI-compatible HTTP API; -1 -> off, 0 -> a free port
    model_name: str = "engram"  # the `model` id the HTTP API serves


@dataclass(kw_only=True, slots=True)
class DistConfig:
    """Distributed training on Ray (`engram train --ray`): tables live on the memory shards."""

    mode: DistMode = "sync"  # sync: equals single-process training | async: lookups may miss `staleness` steps
    staleness: int = 1  # async: lookups of step s see at least steps 1..s-1-staleness applied
    num_workers: int = 0  # Ray Train workers (global batch split across them); 0 -> one per GPU, or 2 on CPU
    use_gpu: bool = False  # one GPU per worker (never more workers than GPUs), NCCL for the dense parameters
    prefetch: bool = True  # the next step's lookups fly while a step computes (false: looked up when needed)
    ray_address: str | None = None  # None -> a local Ray instance (or RAY_ADDRESS, read by the CLI)
    step_timeout_s: float = 120.0  # deadline of a training step's lookups, pushes and waits on the shards


@dataclass(kw_only=True, slots=True)
class SecurityConfig:
    """Who may talk to whom (docs/security.md): credentials and keys as file paths, never a secret itself.

    Local to each process: never taken from the stored layout."""

    # control plane (issue 12b, docs/security.md): Redis auth and the signed layout / slot map / registry
    redis_username: str = ""  # a Redis ACL user; "" -> the default user
    redis_password_file: str = ""  # file holding the Redis password (requirepass or the ACL user's); "" -> none
    redis_ca_file: str = ""  # CA bundle that verifies a rediss:// server; "" -> the system's
    cluster_key_file: str = ""  # file holding the cluster's HMAC-SHA256 key (>= 32 bytes); "" -> entries unsigned

    # --- transport and roles (issue 12a: services/security/) -------------------------------
    tls_enabled: bool = False  # gRPC servers/clients and the TCP data plane speak TLS
    tls_cert: str = ""  # PEM certificate chain of this process (server cert; also its client cert for mTLS)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_ca: str = ""  # PEM CA bundle: peers' certificates must chain to it
    require_client_cert: bool = True  # servers with TLS on: mTLS (the role comes from the client cert)
    server_name: str = ""  # name clients check in the server certificate; "" -> the host they dial
    auth_enabled: bool = False  # servers refuse calls without a role (cert SAN URI engram-role:<role> or token)
    token_file: str = ""  # client: a file holding this process's bearer token (sent when it has no cert role)
    tokens_file: str = ""  # server: a file of `<role> <token>` lines it accepts (read, train, admin)
    allow_plaintext_public: bool = False  # serve without TLS on a non-loopback address (trusted networks only)


@dataclass(kw_only=True, slots=True)
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# presets


def tiny() -> Config:
    """Seconds on a CPU: unit and integration tests."""
    return Config(
        tokenizer=TokenizerConfig(vocab_size=512),
        model=ModelConfig(vocab_size=512, n_layer=2, n_head=2, d_model=32, max_seq_len=64),
        engram=EngramConfig(layer_ids=[1], n_head_per_ngram=2, n_embed_per_ngram=16, table_size_per_ngram=[997, 997]),
        train=TrainConfig(seq_len=32, batch_size=4, steps=20, eval_every=10, eval_batches=2, max_corpus_mb=0.5),
        cluster=ClusterConfig(num_shards=2, num_slots=16),
    )


def cpu() -> Config:
    """The README's main job: a few minutes on a laptop-class CPU."""
    return Config(
        tokenizer=TokenizerConfig(vocab_size=2048),
        model=ModelConfig(vocab_size=2048, n_layer=4, n_head=4, d_model=128, max_seq_len=128),
        engram=EngramConfig(
            layer_ids=[1, 3], n_head_per_ngram=4, n_embed_per_ngram=64, table_size_per_ngram=[20011, 20011]
        ),
        train=TrainConfig(seq_len=64, batch_size=16, steps=400, lr=3e-3, eval_every=100, max_corpus_mb=4.0),
    )


def small() -> Config:
    """A single-GPU run where the Engram gain is measurable."""
    return Config(
        tokenizer=TokenizerConfig(vocab_size=8192),
        model=ModelConfig(vocab_size=8192, n_layer=8, n_head=8, d_model=512, max_seq_len=512),
        engram=EngramConfig(
            layer_ids=[1, 5],
            n_head_per_ngram=8,
            n_embed_per_ngram=256,
            table_size_per_ngram=[200003, 200003],
        ),
        train=TrainConfig(
            seq_len=256, batch_size=32, steps=3000, lr=1e-3, eval_every=500, device="cuda", max_corpus_mb=64.0
        ),
    )


def _paper_backbone() -> ModelConfig:
    # Engram-27B's backbone as the paper states it: 30 layers, d_model 2560, 32 attention heads,
    # mHC with 4 branches, DeepSeek-V3's 128k tokenizer (vocab 129280)
    return ModelConfig(vocab_size=129280, n_layer=30, n_head=32, d_model=2560, max_seq_len=4096, hc_mult=4)


def paper27b() -> Config:
    """The paper's Engram-27B layout, as data (not trainable here).

    Stated in the paper: Engram at layers 2 and 15, N-grams up to 3, 8 heads per order, an Engram
    embedding of 1280 dims per layer (2 orders x 640, so 80 dims per head), 5.7B Engram parameters.
    Rows per head 2,262,400 (= 17.5 x 129280): 2 layers x 2 orders x 8 heads x 80 dims x ~2,262,400
    rows = 5.79B, 1.6% above the paper's stated 5.7B (the sizes are issue 14's; 5.79 may be what
    the paper rounds down to 5.7).
    """
    return Config(
        tokenizer=TokenizerConfig(vocab_size=129280),
        model=_paper_backbone(),
        engram=EngramConfig(
            layer_ids=[2, 15],
            n_head_per_ngram=8,
            n_embed_per_ngram=640,
            table_size_per_ngram=[2_262_400, 2_262_400],
        ),
        train=TrainConfig(device="cuda"),
    )


def paper40b() -> Config:
    """The paper's Engram-40B: Engram-27B's backbone and module with 18.5B Engram parameters.

    7,239,680 rows per head (= 56 x 129280): 2 layers x 2 orders x 8 heads x 80 dims x ~7,239,680
    rows = 18.53B, against the paper's 18.5B.
    """
    cfg = paper27b()
    cfg.engram.table_size_per_ngram = [7_239_680, 7_239_680]
    return cfg


def v41flash() -> Config:
    """DeepSeek-V4.1-Flash's Engram tables (the table side; the model section is a small stand-in).

    Public facts (release notes / checkpoint): layers 1 and 14 (0-based), N-grams up to 4, 8 heads
    per order, 256 FP8 values per row (E4M3 + one UE8M0 scale per 32: 264 bytes), primes ascending
    from 16,000,000 -> 384,006,168 and 384,016,682 rows, |V'| = 99,092 from DeepSeek-V3's tokenizer
    (vocab 129280) through the demo's normaliser chain, pad id 2, seed 0. No short conv.
    The backbone below is NOT V4.1-Flash's: just enough layers for layer 14, for tests; never
    build the model with these tables locally (about 189 GiB of rows).
    """
    return Config(
        tokenizer=TokenizerConfig(vocab_size=129280),
        model=ModelConfig(vocab_size=129280, n_layer=16, n_head=4, d_model=64, max_seq_len=128),
        engram=EngramConfig(
            layer_ids=[1, 14],
            max_ngram_size=4,
            n_head_per_ngram=8,
            n_embed_per_ngram=8 * 256,
            table_size_per_ngram=[16_000_000] * 3,
            pad_id=2,
            seed=0,
            row_format="fp8",
            compressed_vocab_size=99_092,
            short_conv=False,
        ),
        train=TrainConfig(seq_len=128, device="cuda"),
        cluster=ClusterConfig(wire_dtype="fp8", row_mirror=""),  # fp8 rows travel as stored: 264 bytes
    )


PRESETS = {
    "tiny": tiny,
    "cpu": cpu,
    "small": small,
    "paper27b": paper27b,
    "paper40b": paper40b,
    "v41flash": v41flash,
}


# ---------------------------------------------------------------------------------------------
# loading and overriding


def _set_path(cfg: Config, dotted: str, value: Any) -> None:
    section_name, _, field_name = dotted.partition(".")
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section) or not field_name:
        raise ConfigError(
            f"{dotted}: unknown config field (expected section.field, sections: "
            f"{', '.join(f.name for f in dataclasses.fields(cfg))})"
        )
    names = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in names:
        raise ConfigError(f"{dotted}: unknown field of '{section_name}' (known: {', '.join(names)})")
    current = getattr(section, field_name)
    setattr(section, field_name, _coerce(dotted, value, current))


def _coerce(dotted: str, value: Any, current: Any) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if current is not None:
                raise ConfigError(f"{dotted}: cannot parse {value!r}") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
    elif isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    elif isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
    return value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_config_text(text: str, *, toml: bool) -> dict[str, Any]:
    """The nested dict of a `--config` file's text (TOML or JSON)."""
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file: not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file: expected a table of sections, got {type(data).__name__}")
    return data


def load_config(
    preset: str = "cpu",
    file: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: Config | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """base (a copy of it) or preset -> merged file -> merged `data` -> `a.b=value` overrides -> validated Config."""
    if base is not None:
        cfg = copy.deepcopy(base)
    elif preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    else:
        cfg = PRESETS[preset]()
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file: {file} does not exist")
        for dotted, value in _flatten(parse_config_text(path.read_text(), toml=path.suffix == ".toml")).items():
            _set_path(cfg, dotted, value)
    for dotted, value in _flatten(data or {}).items():
        _set_path(cfg, dotted, value)
    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        _set_path(cfg, dotted.strip(), value.strip())
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (checkpoints and the control plane store the tree)."""
    cfg = Config()
    for dotted, value in _flatten(data).items():
        _set_path(cfg, dotted, value)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# validation


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
