"""hpcllm: transformer models over offline text corpora as an MPI batch job."""

__version__ = "0.1.0"
