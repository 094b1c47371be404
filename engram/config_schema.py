"""The sections of the config tree: one dataclass per component, and the enumerations they use.

`engram.config` is the public face (presets, loading, validation); add a field to its section here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

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
    shm_huge_pages: bool = True  # once a table file is filled, ask the kernel for 2 MiB pages (MADV_COLLAPSE)
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
