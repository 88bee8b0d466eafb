"""Analysis of results: hpcllm report, export and filter."""
