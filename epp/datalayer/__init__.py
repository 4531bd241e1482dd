"""The data layer: what the scheduler knows about the pool.

`endpoints` holds the endpoints, their scraped metrics and the picker's in-flight counts; `scrape/` keeps the
metrics fresh (transport, extraction, the scrape loops; engine metric names in `engines`); `discovery/`
keeps the endpoint set equal to the static config or an InferencePool in Kubernetes.
"""
