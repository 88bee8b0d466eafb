"""mpiexec -n N python dedup_runs.py ARGS [--then ARGS ...]: `hpcllm dedup ARGS` once per group, in one launch."""

import sys

from hpcllm.cli import run

args, groups = sys.argv[1:], [[]]
for a in args:
    if a == "--then":
        groups.append([])
    else:
        groups[-1].append(a)
for group in groups:
    code = run(["dedup", *group])
    if code:
        sys.exit(code)
