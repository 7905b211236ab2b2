from google.protobuf import struct_pb2 as _struct_pb2
from service._proto.weightsmith.v1 import job_service_pb2 as _job_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateEvolveJobRequest(_message.Message):
    __slots__ = ("request_id", "config_yaml", "config_struct", "output_path", "trials", "save_model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_STRUCT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    SAVE_MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config_yaml: str
    config_struct: _struct_pb2.Struct
    output_path: str
    trials: int
    save_model: bool
    def __init__(self, request_id: _Optional[str] = ..., config_yaml: _Optional[str] = ..., config_struct: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_path: _Optional[str] = ..., trials: _Optional[int] = ..., save_model: _Optional[bool] = ...) -> None: ...

class CreateEvolveJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class EvolveTrial(_message.Message):
    __slots__ = ("number", "state", "method", "params", "values", "seconds", "error")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: str
    method: str
    params: _struct_pb2.Struct
    values: _containers.RepeatedScalarFieldContainer[float]
    seconds: float
    error: str
    def __init__(self, number: _Optional[int] = ..., state: _Optional[str] = ..., method: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., values: _Optional[_Iterable[float]] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class EvolveResult(_message.Message):
    __slots__ = ("output_path", "output_ref", "objectives", "directions", "trials", "complete", "best", "best_recipe", "best_recipe_yaml", "stopped", "seconds", "files", "executor")
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    BEST_RECIPE_FIELD_NUMBER: _ClassVar[int]
    BEST_RECIPE_YAML_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    output_path: str
    output_ref: str
    objectives: _containers.RepeatedScalarFieldContainer[str]
    directions: _containers.RepeatedScalarFieldContainer[str]
    trials: int
    complete: int
    best: _containers.RepeatedCompositeFieldContainer[EvolveTrial]
    best_recipe: str
    best_recipe_yaml: str
    stopped: str
    seconds: float
    files: _containers.RepeatedScalarFieldContainer[str]
    executor: str
    def __init__(self, output_path: _Optional[str] = ..., output_ref: _Optional[str] = ..., objectives: _Optional[_Iterable[str]] = ..., directions: _Optional[_Iterable[str]] = ..., trials: _Optional[int] = ..., complete: _Optional[int] = ..., best: _Optional[_Iterable[_Union[EvolveTrial, _Mapping]]] = ..., best_recipe: _Optional[str] = ..., best_recipe_yaml: _Optional[str] = ..., stopped: _Optional[str] = ..., seconds: _Optional[float] = ..., files: _Optional[_Iterable[str]] = ..., executor: _Optional[str] = ...) -> None: ...
