from google.protobuf import struct_pb2 as _struct_pb2
from service._proto.weightsmith.v1 import job_service_pb2 as _job_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateAlignJobRequest(_message.Message):
    __slots__ = ("request_id", "model_a", "model_b", "method", "architecture", "spec_ref", "n_heads", "rope", "max_iter", "n_restarts", "seed", "output_path", "overwrite")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SPEC_REF_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITER_FIELD_NUMBER: _ClassVar[int]
    N_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_a: str
    model_b: str
    method: str
    architecture: str
    spec_ref: str
    n_heads: int
    rope: bool
    max_iter: int
    n_restarts: int
    seed: int
    output_path: str
    overwrite: bool
    def __init__(self, request_id: _Optional[str] = ..., model_a: _Optional[str] = ..., model_b: _Optional[str] = ..., method: _Optional[str] = ..., architecture: _Optional[str] = ..., spec_ref: _Optional[str] = ..., n_heads: _Optional[int] = ..., rope: _Optional[bool] = ..., max_iter: _Optional[int] = ..., n_restarts: _Optional[int] = ..., seed: _Optional[int] = ..., output_path: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class CreateAlignJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class Permutation(_message.Message):
    __slots__ = ("id", "indices")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    id: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class AlignResult(_message.Message):
    __slots__ = ("output_path", "output_ref", "method", "objective", "iterations", "restarts", "permutations", "permutations_inline", "spec", "tensors_total", "bytes_written", "units_fixed", "units_total", "seconds")
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PERMUTATIONS_FIELD_NUMBER: _ClassVar[int]
    PERMUTATIONS_INLINE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIXED_FIELD_NUMBER: _ClassVar[int]
    UNITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    output_path: str
    output_ref: str
    method: str
    objective: float
    iterations: int
    restarts: _containers.RepeatedScalarFieldContainer[float]
    permutations: _containers.RepeatedCompositeFieldContainer[Permutation]
    permutations_inline: bool
    spec: _struct_pb2.Struct
    tensors_total: int
    bytes_written: int
    units_fixed: int
    units_total: int
    seconds: float
    def __init__(self, output_path: _Optional[str] = ..., output_ref: _Optional[str] = ..., method: _Optional[str] = ..., objective: _Optional[float] = ..., iterations: _Optional[int] = ..., restarts: _Optional[_Iterable[float]] = ..., permutations: _Optional[_Iterable[_Union[Permutation, _Mapping]]] = ..., permutations_inline: _Optional[bool] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tensors_total: _Optional[int] = ..., bytes_written: _Optional[int] = ..., units_fixed: _Optional[int] = ..., units_total: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ListAlignmentMethodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AlignmentMethod(_message.Message):
    __slots__ = ("name", "summary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class ListAlignmentMethodsResponse(_message.Message):
    __slots__ = ("methods", "architectures", "paper", "url")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    PAPER_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[AlignmentMethod]
    architectures: _containers.RepeatedScalarFieldContainer[str]
    paper: str
    url: str
    def __init__(self, methods: _Optional[_Iterable[_Union[AlignmentMethod, _Mapping]]] = ..., architectures: _Optional[_Iterable[str]] = ..., paper: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...
