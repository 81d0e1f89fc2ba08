from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BlockSpec(_message.Message):
    __slots__ = ("name", "tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("round", "block", "base_version", "tensors", "codec", "raw_bytes", "wire_bytes", "blob_sha256", "chunk_size", "num_chunks", "num_tokens", "train_loss", "timings")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    round: int
    block: str
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    codec: str
    raw_bytes: int
    wire_bytes: int
    blob_sha256: bytes
    chunk_size: int
    num_chunks: int
    num_tokens: int
    train_loss: float
    timings: TaskTimings
    def __init__(self, round: _Optional[int] = ..., block: _Optional[str] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., codec: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., blob_sha256: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., timings: _Optional[_Union[TaskTimings, _Mapping]] = ...) -> None: ...

class TaskTimings(_message.Message):
    __slots__ = ("compute_s", "idle_s", "started_unix", "sent_unix")
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    compute_s: float
    idle_s: float
    started_unix: float
    sent_unix: float
    def __init__(self, compute_s: _Optional[float] = ..., idle_s: _Optional[float] = ..., started_unix: _Optional[float] = ..., sent_unix: _Optional[float] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("name", "version", "device", "num_examples", "protocol", "hardware", "check_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    device: str
    num_examples: int
    protocol: int
    hardware: Hardware
    check_only: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., num_examples: _Optional[int] = ..., protocol: _Optional[int] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., check_only: _Optional[bool] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("hostname", "platform", "python", "torch", "cpu_count", "memory_bytes", "accelerator")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    TORCH_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    platform: str
    python: str
    torch: str
    cpu_count: int
    memory_bytes: int
    accelerator: str
    def __init__(self, hostname: _Optional[str] = ..., platform: _Optional[str] = ..., python: _Optional[str] = ..., torch: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., accelerator: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session", "run_id", "algorithm", "pipeline_depth", "heartbeat_interval_s", "codec", "chunk_size", "max_message_bytes", "blocks", "layers_per_block", "model_version", "model_files", "seed", "rounds", "algorithm_settings", "initial_block_sha256", "protocol", "lora", "codec_files")
    class AlgorithmSettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BLOCK_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FILES_FIELD_NUMBER: _ClassVar[int]
    session: str
    run_id: str
    algorithm: str
    pipeline_depth: int
    heartbeat_interval_s: float
    codec: str
    chunk_size: int
    max_message_bytes: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockSpec]
    layers_per_block: int
    model_version: int
    model_files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    seed: int
    rounds: int
    algorithm_settings: _containers.ScalarMap[str, str]
    initial_block_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    protocol: int
    lora: LoraAdapters
    codec_files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, session: _Optional[str] = ..., run_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., pipeline_depth: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., codec: _Optional[str] = ..., chunk_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockSpec, _Mapping]]] = ..., layers_per_block: _Optional[int] = ..., model_version: _Optional[int] = ..., model_files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., seed: _Optional[int] = ..., rounds: _Optional[int] = ..., algorithm_settings: _Optional[_Mapping[str, str]] = ..., initial_block_sha256: _Optional[_Iterable[bytes]] = ..., protocol: _Optional[int] = ..., lora: _Optional[_Union[LoraAdapters, _Mapping]] = ..., codec_files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class LoraAdapters(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "targets", "seed")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    targets: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., targets: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: bytes
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("round", "blocks", "local_steps", "learning_rate", "base_version", "seeds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    blocks: _containers.RepeatedScalarFieldContainer[str]
    local_steps: int
    learning_rate: float
    base_version: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., blocks: _Optional[_Iterable[str]] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., base_version: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelNotice(_message.Message):
    __slots__ = ("version", "block_versions")
    class BlockVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    block_versions: _containers.ScalarMap[str, int]
    def __init__(self, version: _Optional[int] = ..., block_versions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RunEnd(_message.Message):
    __slots__ = ("reason", "final_version")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    reason: str
    final_version: int
    def __init__(self, reason: _Optional[str] = ..., final_version: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("assignment", "model", "end")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    model: ModelNotice
    end: RunEnd
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., model: _Optional[_Union[ModelNotice, _Mapping]] = ..., end: _Optional[_Union[RunEnd, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("held_version", "local_steps_done")
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    held_version: int
    local_steps_done: int
    def __init__(self, held_version: _Optional[int] = ..., local_steps_done: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    def __init__(self, model_version: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("status", "chunks_received")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    status: str
    chunks_received: int
    def __init__(self, status: _Optional[str] = ..., chunks_received: _Optional[int] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("round", "block", "blob_sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    block: str
    blob_sha256: bytes
    def __init__(self, round: _Optional[int] = ..., block: _Optional[str] = ..., blob_sha256: _Optional[bytes] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("held_chunks", "complete", "delivered", "closed")
    HELD_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    held_chunks: _containers.RepeatedScalarFieldContainer[int]
    complete: bool
    delivered: bool
    closed: bool
    def __init__(self, held_chunks: _Optional[_Iterable[int]] = ..., complete: _Optional[bool] = ..., delivered: _Optional[bool] = ..., closed: _Optional[bool] = ...) -> None: ...

class AbandonRequest(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbandonReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("held_versions", "holds", "task_round", "base_held")
    class HeldVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class HoldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    HELD_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    TASK_ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_HELD_FIELD_NUMBER: _ClassVar[int]
    held_versions: _containers.ScalarMap[str, int]
    holds: _containers.ScalarMap[str, bytes]
    task_round: int
    base_held: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, held_versions: _Optional[_Mapping[str, int]] = ..., holds: _Optional[_Mapping[str, bytes]] = ..., task_round: _Optional[int] = ..., base_held: _Optional[_Iterable[str]] = ...) -> None: ...

class DownloadHeader(_message.Message):
    __slots__ = ("model_version", "num_blocks", "block_versions", "confirmed", "view_round")
    class BlockVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    VIEW_ROUND_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    num_blocks: int
    block_versions: _containers.ScalarMap[str, int]
    confirmed: _containers.RepeatedScalarFieldContainer[str]
    view_round: int
    def __init__(self, model_version: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_versions: _Optional[_Mapping[str, int]] = ..., confirmed: _Optional[_Iterable[str]] = ..., view_round: _Optional[int] = ...) -> None: ...

class DownloadMessage(_message.Message):
    __slots__ = ("header", "manifest", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DownloadHeader
    manifest: Manifest
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[DownloadHeader, _Mapping]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ModelFilesRequest(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "connected", "last_seen_s", "updates_accepted", "current_round", "local_steps", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    connected: bool
    last_seen_s: float
    updates_accepted: int
    current_round: int
    local_steps: int
    device: str
    def __init__(self, name: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_s: _Optional[float] = ..., updates_accepted: _Optional[int] = ..., current_round: _Optional[int] = ..., local_steps: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "algorithm", "round", "rounds_completed", "rounds_total", "workers", "bytes_received", "bytes_sent", "last_eval_loss", "last_eval_round", "state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm: str
    round: int
    rounds_completed: int
    rounds_total: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    bytes_received: int
    bytes_sent: int
    last_eval_loss: float
    last_eval_round: int
    state: str
    def __init__(self, run_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., round: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., rounds_total: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., last_eval_loss: _Optional[float] = ..., last_eval_round: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("round", "base_version", "numbers", "num_tokens", "train_loss", "timings")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_version: int
    numbers: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    train_loss: float
    timings: TaskTimings
    def __init__(self, round: _Optional[int] = ..., base_version: _Optional[int] = ..., numbers: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., timings: _Optional[_Union[TaskTimings, _Mapping]] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("held_version", "after_download")
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    AFTER_DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    held_version: int
    after_download: bool
    def __init__(self, held_version: _Optional[int] = ..., after_download: _Optional[bool] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("round", "learning_rate", "seeds", "scalars")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    round: int
    learning_rate: float
    seeds: _containers.RepeatedScalarFieldContainer[int]
    scalars: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, round: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seeds: _Optional[_Iterable[int]] = ..., scalars: _Optional[_Iterable[float]] = ...) -> None: ...

class LogReply(_message.Message):
    __slots__ = ("model_version", "entries", "download")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    download: bool
    def __init__(self, model_version: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., download: _Optional[bool] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("drop_worker", "reload_tokens", "drain", "set_rounds")
    DROP_WORKER_FIELD_NUMBER: _ClassVar[int]
    RELOAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    SET_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    drop_worker: str
    reload_tokens: bool
    drain: bool
    set_rounds: int
    def __init__(self, drop_worker: _Optional[str] = ..., reload_tokens: _Optional[bool] = ..., drain: _Optional[bool] = ..., set_rounds: _Optional[int] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: str
    def __init__(self, result: _Optional[str] = ...) -> None: ...
