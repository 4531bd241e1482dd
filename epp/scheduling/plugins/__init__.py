"""Built-in scheduling plugins, one per module; each registers itself by type name (see `registry`).

filters/healthy            drop endpoints whose metrics are unreachable
scorers/queue              scraped waiting queue, min-max normalised
scorers/kv_cache           1 - KV-cache utilisation
scorers/lora_affinity      LoRA adapter residency
scorers/inflight           the picker's own in-flight requests / tokens
prefix_cache/scorer        prefix-cache affinity with a load guard (owns its index: prefix_cache/index)
pickers/max_score          highest total, random tie-break
pickers/weighted_random    probability proportional to the total
"""
