"""Generation engine: KV cache (kv_cache), sampling without gathering the vocabulary (sampling),
continuous batching (scheduler), incremental detokenizing and stop strings (text), chat
templates (chat). The job that runs it over a corpus is ``hpcllm.jobs.generate``."""
