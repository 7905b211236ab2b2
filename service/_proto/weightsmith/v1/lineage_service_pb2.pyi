from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LineageCandidate(_message.Message):
    __slots__ = ("name", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class DetectLineageRequest(_message.Message):
    __slots__ = ("child", "candidates", "method", "family_threshold", "path_threshold", "spectral", "spectral_max_dim", "exclude", "keep_heads", "architecture", "n_heads", "spec_ref", "detector_ref", "layers")
    CHILD_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FAMILY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PATH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_MAX_DIM_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    KEEP_HEADS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    SPEC_REF_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_REF_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    child: str
    candidates: _containers.RepeatedCompositeFieldContainer[LineageCandidate]
    method: str
    family_threshold: float
    path_threshold: float
    spectral: str
    spectral_max_dim: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    keep_heads: bool
    architecture: str
    n_heads: int
    spec_ref: str
    detector_ref: str
    layers: bool
    def __init__(self, child: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[LineageCandidate, _Mapping]]] = ..., method: _Optional[str] = ..., family_threshold: _Optional[float] = ..., path_threshold: _Optional[float] = ..., spectral: _Optional[str] = ..., spectral_max_dim: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., keep_heads: _Optional[bool] = ..., architecture: _Optional[str] = ..., n_heads: _Optional[int] = ..., spec_ref: _Optional[str] = ..., detector_ref: _Optional[str] = ..., layers: _Optional[bool] = ...) -> None: ...

class LineageProgress(_message.Message):
    __slots__ = ("stage", "done", "total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("name", "ref", "rank", "score", "related", "votes", "coverage", "n_tensors", "fixed_fraction", "permuted", "path", "metrics", "details")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RELATED_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    N_TENSORS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PERMUTED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ref: str
    rank: int
    score: float
    related: bool
    votes: float
    coverage: float
    n_tensors: int
    fixed_fraction: float
    permuted: bool
    path: float
    metrics: _containers.ScalarMap[str, float]
    details: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., ref: _Optional[str] = ..., rank: _Optional[int] = ..., score: _Optional[float] = ..., related: _Optional[bool] = ..., votes: _Optional[float] = ..., coverage: _Optional[float] = ..., n_tensors: _Optional[int] = ..., fixed_fraction: _Optional[float] = ..., permuted: _Optional[bool] = ..., path: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class LineageSkipped(_message.Message):
    __slots__ = ("name", "ref", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    ref: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., ref: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LineageAnswer(_message.Message):
    __slots__ = ("child", "method", "parent", "answer", "reason", "margin", "chain", "skipped", "seconds", "bytes_read", "result")
    CHILD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    child: str
    method: str
    parent: str
    answer: str
    reason: str
    margin: float
    chain: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedCompositeFieldContainer[LineageSkipped]
    seconds: float
    bytes_read: int
    result: _struct_pb2.Struct
    def __init__(self, child: _Optional[str] = ..., method: _Optional[str] = ..., parent: _Optional[str] = ..., answer: _Optional[str] = ..., reason: _Optional[str] = ..., margin: _Optional[float] = ..., chain: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[_Union[LineageSkipped, _Mapping]]] = ..., seconds: _Optional[float] = ..., bytes_read: _Optional[int] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DetectLineageResponse(_message.Message):
    __slots__ = ("progress", "candidate", "answer")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    progress: LineageProgress
    candidate: CandidateScore
    answer: LineageAnswer
    def __init__(self, progress: _Optional[_Union[LineageProgress, _Mapping]] = ..., candidate: _Optional[_Union[CandidateScore, _Mapping]] = ..., answer: _Optional[_Union[LineageAnswer, _Mapping]] = ...) -> None: ...

class ListLineageMethodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LineageMethod(_message.Message):
    __slots__ = ("name", "summary", "needs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    needs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., needs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListLineageMethodsResponse(_message.Message):
    __slots__ = ("methods",)
    METHODS_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[LineageMethod]
    def __init__(self, methods: _Optional[_Iterable[_Union[LineageMethod, _Mapping]]] = ...) -> None: ...

class RecoverModelGraphRequest(_message.Message):
    __slots__ = ("models", "family_threshold", "merge_threshold", "direction", "no_merges", "exclude", "keep_heads")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MERGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    NO_MERGES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    KEEP_HEADS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[LineageCandidate]
    family_threshold: float
    merge_threshold: float
    direction: str
    no_merges: bool
    exclude: _containers.RepeatedScalarFieldContainer[str]
    keep_heads: bool
    def __init__(self, models: _Optional[_Iterable[_Union[LineageCandidate, _Mapping]]] = ..., family_threshold: _Optional[float] = ..., merge_threshold: _Optional[float] = ..., direction: _Optional[str] = ..., no_merges: _Optional[bool] = ..., exclude: _Optional[_Iterable[str]] = ..., keep_heads: _Optional[bool] = ...) -> None: ...

class ModelGraphEdge(_message.Message):
    __slots__ = ("parent", "child", "kind", "distance", "confidence", "weight")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CHILD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    parent: str
    child: str
    kind: str
    distance: float
    confidence: float
    weight: float
    def __init__(self, parent: _Optional[str] = ..., child: _Optional[str] = ..., kind: _Optional[str] = ..., distance: _Optional[float] = ..., confidence: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class ModelGraphMerge(_message.Message):
    __slots__ = ("name", "components", "base", "residual")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    components: _containers.ScalarMap[str, float]
    base: str
    residual: float
    def __init__(self, name: _Optional[str] = ..., components: _Optional[_Mapping[str, float]] = ..., base: _Optional[str] = ..., residual: _Optional[float] = ...) -> None: ...

class ModelGraphFamily(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelGraph(_message.Message):
    __slots__ = ("models", "families", "roots", "edges", "merges", "skipped", "seconds", "bytes_read", "graph")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    MERGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    families: _containers.RepeatedCompositeFieldContainer[ModelGraphFamily]
    roots: _containers.RepeatedScalarFieldContainer[str]
    edges: _containers.RepeatedCompositeFieldContainer[ModelGraphEdge]
    merges: _containers.RepeatedCompositeFieldContainer[ModelGraphMerge]
    skipped: _containers.RepeatedCompositeFieldContainer[LineageSkipped]
    seconds: float
    bytes_read: int
    graph: _struct_pb2.Struct
    def __init__(self, models: _Optional[_Iterable[str]] = ..., families: _Optional[_Iterable[_Union[ModelGraphFamily, _Mapping]]] = ..., roots: _Optional[_Iterable[str]] = ..., edges: _Optional[_Iterable[_Union[ModelGraphEdge, _Mapping]]] = ..., merges: _Optional[_Iterable[_Union[ModelGraphMerge, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[LineageSkipped, _Mapping]]] = ..., seconds: _Optional[float] = ..., bytes_read: _Optional[int] = ..., graph: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RecoverModelGraphResponse(_message.Message):
    __slots__ = ("progress", "graph")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    progress: LineageProgress
    graph: ModelGraph
    def __init__(self, progress: _Optional[_Union[LineageProgress, _Mapping]] = ..., graph: _Optional[_Union[ModelGraph, _Mapping]] = ...) -> None: ...
