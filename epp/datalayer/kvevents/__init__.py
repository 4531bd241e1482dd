"""Model servers' KV-cache events (vLLM's ZMQ publisher): decoding (`events`) and one subscription per
endpoint of the pool (`subscriber`). Needs the `precise` extra (pyzmq, msgpack)."""
