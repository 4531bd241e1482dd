"""Real vLLM replicas (CPU) for the real-engine test tier and benchmarks.

vLLM runs in a venv of its own (`.venv-vllm`, from `requirements-vllm.txt`, hash-locked) with a tiny model,
tokenizer and LoRA adapters built locally by `build_model.py` (`.cache/realengine`): `./dev realengine` makes
both, and exports where they are (`EPP_REALENGINE_PYTHON`, `EPP_REALENGINE_MODELS`; without them the
checkout's defaults are used). `replicas.RealFleet` starts 2-4 replicas as `epp_lab.procs.Child`ren (each in
its own process group) on 127.0.0.1, with KV-cache events on each replica's port + 1 (replay on + 2).
"""
