from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("address", "engine", "reachable", "metrics_age_s", "waiting", "running", "kv_usage", "running_loras", "waiting_loras", "max_lora", "inflight_requests", "inflight_tokens", "saturation", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    METRICS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_LORAS_FIELD_NUMBER: _ClassVar[int]
    WAITING_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    address: str
    engine: str
    reachable: bool
    metrics_age_s: float
    waiting: float
    running: float
    kv_usage: float
    running_loras: _containers.RepeatedScalarFieldContainer[str]
    waiting_loras: _containers.RepeatedScalarFieldContainer[str]
    max_lora: int
    inflight_requests: int
    inflight_tokens: int
    saturation: float
    details: _containers.ScalarMap[str, float]
    def __init__(self, address: _Optional[str] = ..., engine: _Optional[str] = ..., reachable: _Optional[bool] = ..., metrics_age_s: _Optional[float] = ..., waiting: _Optional[float] = ..., running: _Optional[float] = ..., kv_usage: _Optional[float] = ..., running_loras: _Optional[_Iterable[str]] = ..., waiting_loras: _Optional[_Iterable[str]] = ..., max_lora: _Optional[int] = ..., inflight_requests: _Optional[int] = ..., inflight_tokens: _Optional[int] = ..., saturation: _Optional[float] = ..., details: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("pool", "endpoints", "pool_saturation")
    POOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    POOL_SATURATION_FIELD_NUMBER: _ClassVar[int]
    pool: str
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointInfo]
    pool_saturation: float
    def __init__(self, pool: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[EndpointInfo, _Mapping]]] = ..., pool_saturation: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("path", "headers", "body", "subset", "has_subset")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    HAS_SUBSET_FIELD_NUMBER: _ClassVar[int]
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    subset: _containers.RepeatedScalarFieldContainer[str]
    has_subset: bool
    def __init__(self, path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., subset: _Optional[_Iterable[str]] = ..., has_subset: _Optional[bool] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("address", "dropped_by", "scores", "total", "rank", "details")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BY_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    address: str
    dropped_by: str
    scores: _containers.ScalarMap[str, float]
    total: float
    rank: int
    details: _containers.ScalarMap[str, float]
    def __init__(self, address: _Optional[str] = ..., dropped_by: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., total: _Optional[float] = ..., rank: _Optional[int] = ..., details: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("status", "error_code", "error_message", "destination", "model", "target_model", "priority", "prompt_tokens", "pool_saturation", "weights", "candidates", "details", "flow_control", "flow_reason", "gate_saturation", "queued_ahead")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOL_SATURATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    FLOW_CONTROL_FIELD_NUMBER: _ClassVar[int]
    FLOW_REASON_FIELD_NUMBER: _ClassVar[int]
    GATE_SATURATION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    status: int
    error_code: str
    error_message: str
    destination: str
    model: str
    target_model: str
    priority: int
    prompt_tokens: int
    pool_saturation: float
    weights: _containers.ScalarMap[str, float]
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    details: _containers.ScalarMap[str, float]
    flow_control: str
    flow_reason: str
    gate_saturation: float
    queued_ahead: int
    def __init__(self, status: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., destination: _Optional[str] = ..., model: _Optional[str] = ..., target_model: _Optional[str] = ..., priority: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., pool_saturation: _Optional[float] = ..., weights: _Optional[_Mapping[str, float]] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., details: _Optional[_Mapping[str, float]] = ..., flow_control: _Optional[str] = ..., flow_reason: _Optional[str] = ..., gate_saturation: _Optional[float] = ..., queued_ahead: _Optional[int] = ...) -> None: ...
