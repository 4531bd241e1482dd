"""Which LoRA adapter a request targets, shared by the scorers that care (`lora-affinity`, `latency`)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import SchedulingRequest


def requested_adapter(request: SchedulingRequest, candidates: Sequence[Endpoint]) -> str | None:
    """The adapter `request` targets, or None when it targets a base model. Its target model is an adapter
    when the config marks it one (`request.lora_adapter`), when a candidate reports it running or waiting,
    or when the candidates serve LoRA (`max_lora` > 0) and name the base models they serve (the `model_name`
    label) and the target is not one of them: an adapter no server has loaded yet, which must go where a
    slot is free. (A server started with several `--served-model-name`s labels its metrics with the first:
    requests for the others count as adapters on a LoRA-enabled pool, which only prefers free slots.)"""
    if request.lora_adapter is not None:
        return request.lora_adapter
    target = request.target_model
    lora_pool = False
    named = False
    for e in candidates:
        m = e.metrics
        if target in m.running_loras or target in m.waiting_loras:
            return target
        if m.served_models:
            if target in m.served_models:
                return None
            named = True
        lora_pool = lora_pool or m.max_lora > 0
    return target if lora_pool and named and target else None
