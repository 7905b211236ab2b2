import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from service._proto.weightsmith.v1 import job_service_pb2 as _job_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateZooJobRequest(_message.Message):
    __slots__ = ("request_id", "config_yaml", "config_struct", "output_path", "workers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_STRUCT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config_yaml: str
    config_struct: _struct_pb2.Struct
    output_path: str
    workers: int
    def __init__(self, request_id: _Optional[str] = ..., config_yaml: _Optional[str] = ..., config_struct: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_path: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class CreateZooJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class ZooResult(_message.Message):
    __slots__ = ("output_path", "output_ref", "runs", "models", "built_runs", "seconds", "complete", "summary")
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BUILT_RUNS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    output_path: str
    output_ref: str
    runs: int
    models: int
    built_runs: int
    seconds: float
    complete: bool
    summary: _struct_pb2.Struct
    def __init__(self, output_path: _Optional[str] = ..., output_ref: _Optional[str] = ..., runs: _Optional[int] = ..., models: _Optional[int] = ..., built_runs: _Optional[int] = ..., seconds: _Optional[float] = ..., complete: _Optional[bool] = ..., summary: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CreateTrainJobRequest(_message.Message):
    __slots__ = ("request_id", "zoo", "model", "target", "target_kind", "epochs", "batch_size", "lr", "weight_decay", "patience", "split", "split_seed", "train_fraction", "where", "seed", "model_args", "output_path", "display_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ZOO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_ARGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    zoo: str
    model: str
    target: str
    target_kind: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    split: _containers.RepeatedScalarFieldContainer[float]
    split_seed: int
    train_fraction: float
    where: _struct_pb2.Struct
    seed: int
    model_args: _struct_pb2.Struct
    output_path: str
    display_name: str
    def __init__(self, request_id: _Optional[str] = ..., zoo: _Optional[str] = ..., model: _Optional[str] = ..., target: _Optional[str] = ..., target_kind: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., patience: _Optional[int] = ..., split: _Optional[_Iterable[float]] = ..., split_seed: _Optional[int] = ..., train_fraction: _Optional[float] = ..., where: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., seed: _Optional[int] = ..., model_args: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_path: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class CreateTrainJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_service_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_service_pb2.Job, _Mapping]] = ...) -> None: ...

class TrainEpoch(_message.Message):
    __slots__ = ("epoch", "train_loss", "val_loss", "seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float
    def __init__(self, epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class Metanet(_message.Message):
    __slots__ = ("name", "display_name", "model", "target", "target_kind", "classes", "zoo_path", "zoo_sha256", "metrics", "history", "create_time", "path", "card")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_KIND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ZOO_PATH_FIELD_NUMBER: _ClassVar[int]
    ZOO_SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    model: str
    target: str
    target_kind: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    zoo_path: str
    zoo_sha256: str
    metrics: _containers.ScalarMap[str, float]
    history: _containers.RepeatedCompositeFieldContainer[TrainEpoch]
    create_time: _timestamp_pb2.Timestamp
    path: str
    card: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., model: _Optional[str] = ..., target: _Optional[str] = ..., target_kind: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., zoo_path: _Optional[str] = ..., zoo_sha256: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., history: _Optional[_Iterable[_Union[TrainEpoch, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., path: _Optional[str] = ..., card: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("metanet", "seconds")
    METANET_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    metanet: Metanet
    seconds: float
    def __init__(self, metanet: _Optional[_Union[Metanet, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class ListMetanetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMetanetsResponse(_message.Message):
    __slots__ = ("metanets", "next_page_token", "models")
    METANETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    metanets: _containers.RepeatedCompositeFieldContainer[Metanet]
    next_page_token: str
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metanets: _Optional[_Iterable[_Union[Metanet, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class GetMetanetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetMetanetResponse(_message.Message):
    __slots__ = ("metanet",)
    METANET_FIELD_NUMBER: _ClassVar[int]
    metanet: Metanet
    def __init__(self, metanet: _Optional[_Union[Metanet, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("metanet", "checkpoints", "spec_ref")
    METANET_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_REF_FIELD_NUMBER: _ClassVar[int]
    metanet: str
    checkpoints: _containers.RepeatedScalarFieldContainer[str]
    spec_ref: str
    def __init__(self, metanet: _Optional[str] = ..., checkpoints: _Optional[_Iterable[str]] = ..., spec_ref: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("checkpoint", "number", "label", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    number: float
    label: str
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, checkpoint: _Optional[str] = ..., number: _Optional[float] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("metanet", "target", "predictions", "device")
    METANET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    metanet: str
    target: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    device: str
    def __init__(self, metanet: _Optional[str] = ..., target: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., device: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("metanet", "checkpoints", "spec_ref")
    METANET_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_REF_FIELD_NUMBER: _ClassVar[int]
    metanet: str
    checkpoints: _containers.RepeatedScalarFieldContainer[str]
    spec_ref: str
    def __init__(self, metanet: _Optional[str] = ..., checkpoints: _Optional[_Iterable[str]] = ..., spec_ref: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("checkpoint", "values")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, checkpoint: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("metanet", "embeddings", "device")
    METANET_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    metanet: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    device: str
    def __init__(self, metanet: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., device: _Optional[str] = ...) -> None: ...

class GetZooRequest(_message.Message):
    __slots__ = ("zoo",)
    ZOO_FIELD_NUMBER: _ClassVar[int]
    zoo: str
    def __init__(self, zoo: _Optional[str] = ...) -> None: ...

class GetZooResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: _struct_pb2.Struct
    def __init__(self, summary: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
