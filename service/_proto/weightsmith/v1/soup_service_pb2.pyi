from service._proto.weightsmith.v1 import job_service_pb2 as _job_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SoupMemberSpec(_message.Message):
    __slots__ = ("model", "id", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    weight: float
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class CreateSoupRequest(_message.Message):
    __slots__ = ("request_id", "soup", "members", "base", "dtype", "display_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOUP_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    soup: str
    members: _containers.RepeatedCompositeFieldContainer[SoupMemberSpec]
    base: str
    dtype: str
    display_name: str
    def __init__(self, request_id: _Optional[str] = ..., soup: _Optional[str] = ..., members: _Optional[_Iterable[_Union[SoupMemberSpec, _Mapping]]] = ..., base: _Optional[str] = ..., dtype: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class CreateSoupResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class AddSoupMemberRequest(_message.Message):
    __slots__ = ("request_id", "soup", "member")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOUP_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    soup: str
    member: SoupMemberSpec
    def __init__(self, request_id: _Optional[str] = ..., soup: _Optional[str] = ..., member: _Optional[_Union[SoupMemberSpec, _Mapping]] = ...) -> None: ...

class AddSoupMemberResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class RemoveSoupMemberRequest(_message.Message):
    __slots__ = ("request_id", "soup", "member_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOUP_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    soup: str
    member_id: str
    def __init__(self, request_id: _Optional[str] = ..., soup: _Optional[str] = ..., member_id: _Optional[str] = ...) -> None: ...

class RemoveSoupMemberResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class BuildSoupRequest(_message.Message):
    __slots__ = ("request_id", "soup", "output_path", "overwrite", "shard_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOUP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    soup: str
    output_path: str
    overwrite: bool
    shard_size: int
    def __init__(self, request_id: _Optional[str] = ..., soup: _Optional[str] = ..., output_path: _Optional[str] = ..., overwrite: _Optional[bool] = ..., shard_size: _Optional[int] = ...) -> None: ...

class BuildSoupResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class GetSoupRequest(_message.Message):
    __slots__ = ("soup", "verify")
    SOUP_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    soup: str
    verify: bool
    def __init__(self, soup: _Optional[str] = ..., verify: _Optional[bool] = ...) -> None: ...

class GetSoupResponse(_message.Message):
    __slots__ = ("soup",)
    SOUP_FIELD_NUMBER: _ClassVar[int]
    soup: Soup
    def __init__(self, soup: _Optional[_Union[Soup, _Mapping]] = ...) -> None: ...

class SoupMember(_message.Message):
    __slots__ = ("id", "weight", "path", "hash", "added", "status")
    ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    weight: float
    path: str
    hash: str
    added: str
    status: str
    def __init__(self, id: _Optional[str] = ..., weight: _Optional[float] = ..., path: _Optional[str] = ..., hash: _Optional[str] = ..., added: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class SoupEvent(_message.Message):
    __slots__ = ("time", "op", "member", "members", "soup_id")
    TIME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SOUP_ID_FIELD_NUMBER: _ClassVar[int]
    time: str
    op: str
    member: str
    members: _containers.RepeatedScalarFieldContainer[str]
    soup_id: str
    def __init__(self, time: _Optional[str] = ..., op: _Optional[str] = ..., member: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., soup_id: _Optional[str] = ...) -> None: ...

class Soup(_message.Message):
    __slots__ = ("path", "ref", "display_name", "kind", "dtype", "soup_id", "members", "total_weight", "summed", "copied", "base", "history", "leftovers")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SUMMED_FIELD_NUMBER: _ClassVar[int]
    COPIED_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    LEFTOVERS_FIELD_NUMBER: _ClassVar[int]
    path: str
    ref: str
    display_name: str
    kind: str
    dtype: str
    soup_id: str
    members: _containers.RepeatedCompositeFieldContainer[SoupMember]
    total_weight: float
    summed: _containers.RepeatedScalarFieldContainer[str]
    copied: _containers.RepeatedScalarFieldContainer[str]
    base: SoupMember
    history: _containers.RepeatedCompositeFieldContainer[SoupEvent]
    leftovers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., ref: _Optional[str] = ..., display_name: _Optional[str] = ..., kind: _Optional[str] = ..., dtype: _Optional[str] = ..., soup_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[SoupMember, _Mapping]]] = ..., total_weight: _Optional[float] = ..., summed: _Optional[_Iterable[str]] = ..., copied: _Optional[_Iterable[str]] = ..., base: _Optional[_Union[SoupMember, _Mapping]] = ..., history: _Optional[_Iterable[_Union[SoupEvent, _Mapping]]] = ..., leftovers: _Optional[_Iterable[str]] = ...) -> None: ...

class SoupResult(_message.Message):
    __slots__ = ("operation", "soup", "output_path", "output_ref", "seconds")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    SOUP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    operation: str
    soup: Soup
    output_path: str
    output_ref: str
    seconds: float
    def __init__(self, operation: _Optional[str] = ..., soup: _Optional[_Union[Soup, _Mapping]] = ..., output_path: _Optional[str] = ..., output_ref: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...
