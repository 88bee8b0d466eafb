"""Command line: ``hpcllm SUBCOMMAND ...`` (also ``python -m hpcllm``).

Subcommands:

* the executor's jobs (table ``JOBS``): ``embed``, ``score``, ``generate``,
  ``train-classifier``, ``classify``, ``tokenize``, ``rerank``, ``dedup``; their options derive from
  hpcllm.config.JobConfig (flags over ``--config FILE.toml`` over defaults), and
  ``--follow`` runs any of them on files as they land; a job's module is imported
  only when it runs;
* ``convert``: HF model directory or GGUF file -> HDF5 checkpoint
  (hpcllm.checkpoint.convert; under mpiexec each rank writes a rank file, joined by a master);
* ``inspect``: summary of a checkpoint or a results file;
* ``report``, ``export``, ``filter``: the results' analysis (hpcllm.analysis.commands).

Every rank runs the same command. A user error (HpcllmError) prints one line,
``hpcllm: error: ...``, and exits 2 on every rank that hits it (the checks run
on all ranks alike, so none waits for another). Any other exception prints its
traceback and aborts the whole MPI job, so a failure on one rank never hangs
the others.
"""

import argparse
import os
import sys
import traceback

from hpcllm import __version__
from hpcllm.errors import HpcllmError

# Jobs of the executor (hpcllm.executor): subcommand -> (module, class, help). Options come from JobConfig.
JOBS = {
    "embed": ("hpcllm.jobs.embed", "EmbedJob", "sentence embeddings of every document (encoder or decoder models)"),
    "score": ("hpcllm.jobs.score", "ScoreJob", "log-likelihood / perplexity of every document (decoder models)"),
    "train-classifier": ("hpcllm.jobs.train_classifier", "TrainClassifierJob",
                         "embed a labelled corpus and train a classifier head on it (classifier.h5)"),
    "classify": ("hpcllm.jobs.classify", "ClassifyJob",
                 "label every document: a classifier (encoder + head), or zero-shot --labels with a decoder"),
    "generate": ("hpcllm.jobs.generate", "GenerateJob", "generate text for every prompt (decoder models)"),
    "tokenize": ("hpcllm.jobs.tokenize", "TokenizeJob", "tokenize a corpus into HDF5 token shards (input of the jobs)"),
    "rerank": ("hpcllm.jobs.rerank", "RerankJob", "one relevance score per (query, document) pair (cross-encoders, "
               "decoder rerankers)"),
    "dedup": ("hpcllm.jobs.dedup", "DedupJob",
              "exact and near-duplicate documents (MinHash LSH): clusters and keep flags"),
}
# Modules with subcommands of their own: each has add_parsers(sub), whose parsers set `func(args) -> int`.
COMMAND_MODULES = ("hpcllm.analysis.commands",)


def build_parser():
    from hpcllm.config import add_arguments

    p = argparse.ArgumentParser(prog="hpcllm", description="Transformer models over offline text corpora, on MPI.")
    p.add_argument("--version", action="version", version=f"hpcllm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="HF model directory or GGUF file -> HDF5 checkpoint")
    c.add_argument("source")
    c.add_argument("dest")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored weight dtype")
    c.add_argument("--weights", choices=("float", "int8"), default="float",
                   help="int8: a decoder's linear weights as int8 codes with per-output-channel scales")
    i = sub.add_parser("inspect", help="summarise a checkpoint or a results file")
    i.add_argument("path")
    for job, (_, _, text) in JOBS.items():
        add_arguments(sub.add_parser(job, help=text), job)
    import importlib

    for name in COMMAND_MODULES:   # an ImportError here is a broken install: let it show
        importlib.import_module(name).add_parsers(sub)
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from hpcllm.checkpoint.convert import convert
        from hpcllm.world.launch import launched_world

        world = launched_world()
        digest = convert(args.source, args.dest, args.dtype, comm=world, weights=args.weights)
        if world is None or world.Get_rank() == 0:
            shards = f", {world.Get_size()} shard files" if world is not None else ""
            print(f"wrote {args.dest} (content hash {digest[:16]}{shards})")
        return 0
    if args.command == "inspect":
        from hpcllm.inspect import inspect_file

        print(inspect_file(args.path))
        return 0
    if args.command in JOBS:
        import importlib

        from hpcllm.config import load_config
        from hpcllm.executor.run import run_job

        module, name, _ = JOBS[args.command]
        return run_job(load_config(args, args.command), getattr(importlib.import_module(module), name))
    return args.func(args)


def main(argv=None):
    try:
        code = run(argv)
    except HpcllmError as exc:
        # one write, so lines of several ranks forwarded by mpiexec never interleave
        sys.stderr.flush()
        os.write(2, f"hpcllm: error: {exc}{_where()}\n".encode())
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - anything unexpected must end every rank
        traceback.print_exc()
        sys.stderr.flush()
        _abort()
        code = 1
    sys.exit(code)


def _where() -> str:
    """' (rank R)' when running under MPI with several ranks."""
    if "mpi4py.MPI" not in sys.modules:
        return ""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return f" (rank {world.Get_rank()})" if world.Get_size() > 1 else ""


def _abort():
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(1)


if __name__ == "__main__":
    main()
