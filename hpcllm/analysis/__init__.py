"""Analysis of results: hpcllm report, export and filter (the notebook API is hpcllm.results)."""
