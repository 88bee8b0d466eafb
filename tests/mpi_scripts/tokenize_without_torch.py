"""mpiexec -n N python tokenize_without_torch.py ARGS: `hpcllm tokenize ARGS`, failing if it imported torch."""

import sys

from hpcllm.cli import run

code = run(["tokenize", *sys.argv[1:]])
if "torch" in sys.modules:
    sys.exit("the tokenize job imported torch")
sys.exit(code)
