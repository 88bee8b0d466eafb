"""Everything hpcllm writes to disk and reads back: atomic writes, the results
schema and files, token shards, the manifest, and ``hpcllm inspect``."""
