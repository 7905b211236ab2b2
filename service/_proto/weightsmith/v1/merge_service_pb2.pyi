import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from service._proto.weightsmith.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MergeJobOptions(_message.Message):
    __slots__ = ("compute_dtype", "shard_size", "workers")
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    compute_dtype: str
    shard_size: int
    workers: int
    def __init__(self, compute_dtype: _Optional[str] = ..., shard_size: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class CreateMergeJobRequest(_message.Message):
    __slots__ = ("request_id", "recipe_yaml", "recipe_struct", "output_path", "overwrite", "options", "validate_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_YAML_FIELD_NUMBER: _ClassVar[int]
    RECIPE_STRUCT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    recipe_yaml: str
    recipe_struct: _struct_pb2.Struct
    output_path: str
    overwrite: bool
    options: MergeJobOptions
    validate_only: bool
    def __init__(self, request_id: _Optional[str] = ..., recipe_yaml: _Optional[str] = ..., recipe_struct: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_path: _Optional[str] = ..., overwrite: _Optional[bool] = ..., options: _Optional[_Union[MergeJobOptions, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class MergePlanSummary(_message.Message):
    __slots__ = ("method", "models", "tensors_total", "tensors_merged", "tensors_copied", "bytes_in", "bytes_out", "compute_dtype", "peak_bytes_estimate")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_MERGED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    method: str
    models: _containers.RepeatedScalarFieldContainer[str]
    tensors_total: int
    tensors_merged: int
    tensors_copied: int
    bytes_in: int
    bytes_out: int
    compute_dtype: str
    peak_bytes_estimate: int
    def __init__(self, method: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., tensors_total: _Optional[int] = ..., tensors_merged: _Optional[int] = ..., tensors_copied: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., peak_bytes_estimate: _Optional[int] = ...) -> None: ...

class CreateMergeJobResponse(_message.Message):
    __slots__ = ("job", "plan")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    plan: MergePlanSummary
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ..., plan: _Optional[_Union[MergePlanSummary, _Mapping]] = ...) -> None: ...

class ResolvedModel(_message.Message):
    __slots__ = ("ref", "path", "repo_id", "revision", "commit")
    REF_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    path: str
    repo_id: str
    revision: str
    commit: str
    def __init__(self, ref: _Optional[str] = ..., path: _Optional[str] = ..., repo_id: _Optional[str] = ..., revision: _Optional[str] = ..., commit: _Optional[str] = ...) -> None: ...

class MergeResult(_message.Message):
    __slots__ = ("output_path", "output_ref", "method", "tensors_total", "bytes_written", "shards", "seconds", "models")
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    output_path: str
    output_ref: str
    method: str
    tensors_total: int
    bytes_written: int
    shards: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    models: _containers.RepeatedCompositeFieldContainer[ResolvedModel]
    def __init__(self, output_path: _Optional[str] = ..., output_ref: _Optional[str] = ..., method: _Optional[str] = ..., tensors_total: _Optional[int] = ..., bytes_written: _Optional[int] = ..., shards: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ..., models: _Optional[_Iterable[_Union[ResolvedModel, _Mapping]]] = ...) -> None: ...

class MergeJob(_message.Message):
    __slots__ = ("name", "state", "progress", "create_time", "start_time", "end_time", "request_id", "recipe_yaml", "method", "output_path", "overwrite", "options", "attempt", "estimated_peak_bytes", "cancel_requested", "error", "result", "last_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_YAML_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _job_pb2.JobState
    progress: _job_pb2.JobProgress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    request_id: str
    recipe_yaml: str
    method: str
    output_path: str
    overwrite: bool
    options: MergeJobOptions
    attempt: int
    estimated_peak_bytes: int
    cancel_requested: bool
    error: _job_pb2.JobError
    result: MergeResult
    last_sequence: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., progress: _Optional[_Union[_job_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., recipe_yaml: _Optional[str] = ..., method: _Optional[str] = ..., output_path: _Optional[str] = ..., overwrite: _Optional[bool] = ..., options: _Optional[_Union[MergeJobOptions, _Mapping]] = ..., attempt: _Optional[int] = ..., estimated_peak_bytes: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., error: _Optional[_Union[_job_pb2.JobError, _Mapping]] = ..., result: _Optional[_Union[MergeResult, _Mapping]] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class GetMergeJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class WatchMergeJobRequest(_message.Message):
    __slots__ = ("name", "from_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    from_sequence: int
    def __init__(self, name: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class WatchMergeJobResponse(_message.Message):
    __slots__ = ("sequence", "time", "job")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    job: MergeJob
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class CancelMergeJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class RetryMergeJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RetryMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class ListMergeJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ...) -> None: ...

class ListMergeJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[MergeJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[MergeJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListMethodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodParameter(_message.Message):
    __slots__ = ("name", "type", "per_model", "required", "default_value", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PER_MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    per_model: bool
    required: bool
    default_value: _struct_pb2.Value
    path: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., per_model: _Optional[bool] = ..., required: _Optional[bool] = ..., default_value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., path: _Optional[bool] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "summary", "paper", "url", "kind", "base_model", "min_models", "max_models", "randomized", "parameters", "parameter_schema")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PAPER_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZED_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    paper: str
    url: str
    kind: str
    base_model: str
    min_models: int
    max_models: int
    randomized: bool
    parameters: _containers.RepeatedCompositeFieldContainer[MethodParameter]
    parameter_schema: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., paper: _Optional[str] = ..., url: _Optional[str] = ..., kind: _Optional[str] = ..., base_model: _Optional[str] = ..., min_models: _Optional[int] = ..., max_models: _Optional[int] = ..., randomized: _Optional[bool] = ..., parameters: _Optional[_Iterable[_Union[MethodParameter, _Mapping]]] = ..., parameter_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListMethodsResponse(_message.Message):
    __slots__ = ("methods",)
    METHODS_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    def __init__(self, methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ...) -> None: ...
