from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    FP32: _ClassVar[WireDtype]
    BF16: _ClassVar[WireDtype]
    FP16: _ClassVar[WireDtype]
    FP8_E4M3_UE8M0: _ClassVar[WireDtype]
WIRE_DTYPE_UNSPECIFIED: WireDtype
FP32: WireDtype
BF16: WireDtype
FP16: WireDtype
FP8_E4M3_UE8M0: WireDtype

class LookupRequest(_message.Message):
    __slots__ = ("table", "epoch", "row_ids", "dtype", "request_id", "step", "max_staleness")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    table: int
    epoch: int
    row_ids: bytes
    dtype: WireDtype
    request_id: str
    step: int
    max_staleness: int
    def __init__(self, table: _Optional[int] = ..., epoch: _Optional[int] = ..., row_ids: _Optional[bytes] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rows", "dim", "dtype", "epoch", "applied_step")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    dim: int
    dtype: WireDtype
    epoch: int
    applied_step: int
    def __init__(self, rows: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., epoch: _Optional[int] = ..., applied_step: _Optional[int] = ...) -> None: ...

class OptimizerParams(_message.Message):
    __slots__ = ("kind", "lr", "beta1", "beta2", "eps", "version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    version: int
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("table", "epoch", "row_ids", "grads", "step", "optimizer", "part_id", "num_parts", "max_staleness")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PART_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    table: int
    epoch: int
    row_ids: bytes
    grads: bytes
    step: int
    optimizer: OptimizerParams
    part_id: str
    num_parts: int
    max_staleness: int
    def __init__(self, table: _Optional[int] = ..., epoch: _Optional[int] = ..., row_ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., step: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerParams, _Mapping]] = ..., part_id: _Optional[str] = ..., num_parts: _Optional[int] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ("applied_step", "rows_updated", "pending")
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    applied_step: int
    rows_updated: int
    pending: bool
    def __init__(self, applied_step: _Optional[int] = ..., rows_updated: _Optional[int] = ..., pending: _Optional[bool] = ...) -> None: ...

class SlotFile(_message.Message):
    __slots__ = ("table", "slot", "path", "sha256", "num_rows", "num_bytes")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    table: int
    slot: int
    path: str
    sha256: str
    num_rows: int
    num_bytes: int
    def __init__(self, table: _Optional[int] = ..., slot: _Optional[int] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., num_rows: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("name", "step")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[SlotFile]
    def __init__(self, files: _Optional[_Iterable[_Union[SlotFile, _Mapping]]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("name", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    files: _containers.RepeatedCompositeFieldContainer[SlotFile]
    def __init__(self, name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[SlotFile, _Mapping]]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("step", "slots_restored")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SLOTS_RESTORED_FIELD_NUMBER: _ClassVar[int]
    step: int
    slots_restored: int
    def __init__(self, step: _Optional[int] = ..., slots_restored: _Optional[int] = ...) -> None: ...

class SlotChunk(_message.Message):
    __slots__ = ("table", "slot", "epoch", "weights", "state", "applied_step", "last", "offset_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: int
    slot: int
    epoch: int
    weights: bytes
    state: bytes
    applied_step: int
    last: bool
    offset_rows: int
    def __init__(self, table: _Optional[int] = ..., slot: _Optional[int] = ..., epoch: _Optional[int] = ..., weights: _Optional[bytes] = ..., state: _Optional[bytes] = ..., applied_step: _Optional[int] = ..., last: _Optional[bool] = ..., offset_rows: _Optional[int] = ...) -> None: ...

class MigrateSlotsRequest(_message.Message):
    __slots__ = ("slots", "target", "epoch")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    target: str
    epoch: int
    def __init__(self, slots: _Optional[_Iterable[int]] = ..., target: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class MigrateSlotsResponse(_message.Message):
    __slots__ = ("slots_sent", "bytes_sent")
    SLOTS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    slots_sent: int
    bytes_sent: int
    def __init__(self, slots_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class ImportSlotsResponse(_message.Message):
    __slots__ = ("slots_received",)
    SLOTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    slots_received: int
    def __init__(self, slots_received: _Optional[int] = ...) -> None: ...

class SetSlotMapRequest(_message.Message):
    __slots__ = ("epoch", "owned_slots", "owners")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OWNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    owned_slots: _containers.RepeatedScalarFieldContainer[int]
    owners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., owned_slots: _Optional[_Iterable[int]] = ..., owners: _Optional[_Iterable[int]] = ...) -> None: ...

class SetSlotMapResponse(_message.Message):
    __slots__ = ("slots_dropped",)
    SLOTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    slots_dropped: int
    def __init__(self, slots_dropped: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("table", "num_rows", "dim", "weight_bytes", "state_bytes", "applied_step", "mirror_bytes")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BYTES_FIELD_NUMBER: _ClassVar[int]
    table: int
    num_rows: int
    dim: int
    weight_bytes: int
    state_bytes: int
    applied_step: int
    mirror_bytes: int
    def __init__(self, table: _Optional[int] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., state_bytes: _Optional[int] = ..., applied_step: _Optional[int] = ..., mirror_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "epoch", "slots", "tables", "rss_bytes", "lookups", "rows_served", "updates", "max_staleness_seen")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_SEEN_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    rss_bytes: int
    lookups: int
    rows_served: int
    updates: int
    max_staleness_seen: int
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., rss_bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., rows_served: _Optional[int] = ..., updates: _Optional[int] = ..., max_staleness_seen: _Optional[int] = ...) -> None: ...
