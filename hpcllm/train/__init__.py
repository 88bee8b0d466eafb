"""Training heads on embeddings with every rank holding its shard of the data (hpcllm train-classifier)."""
