"""The engine floor: schedule → execute → update (`llm_engine.py`), its frozen configs and the
options that set them (`config.py`, `options.py`), the KV-cache contract and its two caches
(`kv_cache.py`, `dense_kv_cache.py`, `tiered_kv_cache.py`), batching, sampling and CUDA graphs."""
