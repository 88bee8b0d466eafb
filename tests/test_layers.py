"""The package's layers, read from the source: who may import whom, and no import cycle.

Every import statement counts: at module level, inside functions and classes,
under ``try`` and ``if TYPE_CHECKING``; relative imports are resolved
(kernels/ is packaged as hpcllm.kernels), ``from hpcllm.x import y`` is an
import of the module hpcllm.x.y where there is one, and a string constant
naming an hpcllm module (the cli's table of job modules, loaded with
importlib) is an import too. Importing hpcllm.a.b also runs hpcllm/a/__init__.py;
that implicit edge is not counted (a package's __init__ may import its own
modules).

A *layer* is a subpackage (hpcllm.corpus, ...) or one root module
(hpcllm.config, ...; ``hpcllm`` is the package's __init__, ``__version__``).
ALLOWED says which layers each may import, as the code does today; RULES are
the design those entries must keep (the data path reads one direction, the
model knows nothing of how it is run, jobs are leaves, ...).
"""

import ast
import os
from collections import deque

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "hpcllm")

# Layer -> the layers it may import (besides itself). Each entry is what the code imports now; a new
# edge is a design decision: add it here with its reason, and test_allowed_keeps_the_rules says
# whether it breaks a rule.
ALLOWED = {
    # leaves: nothing from hpcllm
    "hpcllm": (),                  # __init__: __version__
    "errors": (),                  # HpcllmError
    "status": (),                  # the per-document Status codes
    "progress": (),                # log(), Timers and the timing PHASES, the progress line
    "kernels": (),                 # Numba kernels: numpy arrays in and out
    "model_packages": ("errors",),
    "world": ("errors",),          # MPI: mesh, Comm, counters, collectives, Slurm, launch
    # the data path: corpus -> tokens -> batches (corpus.batching) -> model -> results
    "corpus": ("errors", "status", "world"),
    "tokenizer": ("errors", "kernels"),
    "model": ("errors", "world"),  # plain PyTorch, plus the tp group's Comm in the parallel layers
    "store": ("hpcllm", "errors", "status", "corpus", "world"),   # the files a run writes, per corpus Shard
    # report / export / filter read results.h5; filter re-reads its input corpus (zstd, Parquet) to copy rows
    "analysis": ("errors", "status", "progress", "corpus", "store", "world"),
    "results": ("analysis",),      # the notebook API over analysis.columns
    # what runs the data path
    "checkpoint": ("errors", "model", "store", "tokenizer", "world"),   # split plan, GGUF tokenizer, shard files
    "signals": ("store", "world"),
    "scoring": ("model", "world", "corpus"),      # log-softmax of vocab-parallel logits; windows batched as corpus.batching does
    "generate": ("errors", "kernels", "model"),   # the generation engine: a library of jobs.generate
    "executor": ("hpcllm", "errors", "status", "progress", "corpus", "tokenizer", "model", "store",
                 "checkpoint", "world", "signals"),
    "train": ("errors", "status", "progress", "corpus", "tokenizer", "store", "checkpoint", "world",
              "executor"),        # finetune re-reads its documents through executor.inputs
    # dedup's library: normalised text, MinHash LSH, spilled band runs, components; semantic dedup reads an
    # embed result's vectors
    "dedup": ("errors", "kernels", "tokenizer", "world", "analysis"),
    "jobs": ("errors", "status", "progress", "corpus", "tokenizer", "model", "store", "checkpoint", "world",
             "executor", "generate", "train", "scoring", "dedup", "kernels"),   # dedup: the MinHash kernels
    # the front ends
    "config": ("errors", "corpus"),             # option defaults from their home (corpus.shard)
    "inspect": ("errors", "status", "model", "store", "checkpoint", "train"),
    "cli": ("hpcllm", "errors", "config", "inspect", "checkpoint", "world", "executor", "jobs", "analysis"),
    "__main__": ("cli",),
}

DATA_PATH = ("corpus", "tokenizer", "model", "store", "analysis", "results")
LEAVES = ("hpcllm", "errors", "status", "progress", "kernels")


def _rule_data_path_one_direction(allowed):
    """A stage of the data path never imports a later one (the corpus knows no tokenizer, the
    tokenizer no model, the model no results file)."""
    return [f"{a} may import {b}, a later stage" for i, a in enumerate(DATA_PATH)
            for b in DATA_PATH[i + 1:] if b in allowed[a]]


def _rule_compute_stages_stand_alone(allowed):
    """Tokenizer and model take arrays and tensors: they import no other stage of the data path (only
    the results side looks back, at the corpus Shard its rows come from)."""
    return [f"{a} may import {b}" for a in ("tokenizer", "model") for b in DATA_PATH if b in allowed[a]]


def _rule_model_knows_nothing_of_running(allowed):
    """The model knows nothing of executor, jobs, training, generation, checkpoint files or the CLI."""
    return [f"model may import {b}" for b in ("executor", "jobs", "train", "generate", "checkpoint", "store",
                                              "signals", "config", "cli") if b in allowed["model"]]


def _rule_jobs_are_leaves(allowed):
    """No layer imports a job but the cli (which loads them by name)."""
    return [f"{a} may import jobs" for a, b in allowed.items() if "jobs" in b and a != "cli"]


def _rule_executor_knows_no_job(allowed):
    """The executor runs any job through the Job interface: no job, engine or trainer of its own."""
    return [f"executor may import {b}" for b in ("jobs", "generate", "train", "scoring", "analysis", "cli")
            if b in allowed["executor"]]


def _rule_generate_is_a_library(allowed):
    """The generation engine runs a shard's prompts on a model: it knows no executor, job, file or corpus."""
    return [f"generate may import {b}" for b in ("executor", "jobs", "store", "corpus", "checkpoint", "train",
                                                 "analysis", "cli") if b in allowed["generate"]]


def _rule_train_knows_no_job(allowed):
    """Training is called by the train-classifier job, never the other way; it builds no model itself."""
    return [f"train may import {b}" for b in ("jobs", "generate", "analysis", "model", "cli")
            if b in allowed["train"]]


def _rule_analysis_runs_no_model(allowed):
    """report / export / filter read result files; they run no model, executor or job."""
    return [f"analysis may import {b}" for b in ("model", "tokenizer", "executor", "jobs", "train", "generate",
                                                 "checkpoint", "cli") if b in allowed["analysis"]]


def _rule_leaves(allowed):
    """errors, status, progress, kernels and the package __init__ import nothing from hpcllm."""
    return [f"{a} may import {list(allowed[a])}" for a in LEAVES if allowed[a]]


def _rule_front_ends_on_top(allowed):
    """Only __main__ imports the cli, only the cli imports config and inspect, and the notebook API
    (results.py) imports nothing but analysis."""
    bad = [f"{a} may import cli" for a, b in allowed.items() if "cli" in b and a != "__main__"]
    bad += [f"{a} may import {f}" for a, b in allowed.items() for f in ("config", "inspect")
            if f in b and a != "cli"]
    return bad + [f"results may import {b}" for b in allowed["results"] if b != "analysis"]


RULES = [v for k, v in sorted(globals().items()) if k.startswith("_rule_")]


# --------------------------------------------------------------------------- reading the source

def _modules():
    """{module name: path} of hpcllm/ and kernels/ (packaged as hpcllm.kernels)."""
    out = {}
    for root, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    kernels = os.path.join(REPO, "kernels")
    for name in os.listdir(kernels):
        if name.endswith(".py"):
            out["hpcllm.kernels" + ("" if name == "__init__.py" else "." + name[:-3])] = os.path.join(kernels, name)
    return out


MODULES = _modules()


def _is_package(module):
    return MODULES.get(module, "").endswith("__init__.py")


def imports(module, source, modules=MODULES):
    """[(line, imported module name)] of every import statement in ``source``, anywhere in the tree,
    plus every string constant that names an hpcllm module (importlib.import_module of a table)."""
    package = module if modules.get(module, "").endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in modules else base))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in modules:
            out.append((node.lineno, node.value))
    return out


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


IMPORTS = {m: imports(m, _read(p)) for m, p in MODULES.items()}


def _known(name):
    """The hpcllm module an import names (its longest known prefix), or None outside hpcllm."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def layer(module):
    parts = module.split(".")
    return "hpcllm" if len(parts) == 1 else parts[1]


def _where(module, line):
    return f"{os.path.relpath(MODULES[module], REPO)}:{line}"


# --------------------------------------------------------------------------- the tests

def test_the_reader_sees_every_import():
    src = '''
import os
from . import sibling
from .sibling import thing
from .. import other
try:
    from hpcllm.a import b
except ImportError:
    import hpcllm.c
if TYPE_CHECKING:
    from hpcllm.d import Name
def f():
    from hpcllm.e import g
class K:
    def m(self):
        import hpcllm.h as h
TABLE = {"x": "hpcllm.i"}
DOC = "hpcllm.e is mentioned here"
'''
    mods = {m: f"/{m.replace('.', '/')}.py" for m in
            ("hpcllm.p.q", "hpcllm.p.sibling", "hpcllm.other", "hpcllm.a.b", "hpcllm.c", "hpcllm.d", "hpcllm.e",
             "hpcllm.h", "hpcllm.i")}
    got = sorted(imports("hpcllm.p.q", src, mods))
    assert got == [(2, "os"), (3, "hpcllm.p.sibling"), (4, "hpcllm.p.sibling"), (5, "hpcllm.other"),
                   (7, "hpcllm.a.b"), (9, "hpcllm.c"), (11, "hpcllm.d"), (13, "hpcllm.e"), (16, "hpcllm.h"),
                   (17, "hpcllm.i")], got
    # "from hpcllm.a import x": the package when x is not a module of it
    assert imports("hpcllm.p.q", "from hpcllm.a import x", mods) == [(1, "hpcllm.a")]


def test_every_layer_has_rules():
    missing = sorted({layer(m) for m in MODULES} - set(ALLOWED))
    assert not missing, f"layers without an ALLOWED entry in tests/test_layers.py: {missing}"
    unknown = sorted({b for v in ALLOWED.values() for b in v} - set(ALLOWED))
    assert not unknown, f"ALLOWED names layers that do not exist: {unknown}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__.removeprefix("_rule_"))
def test_allowed_keeps_the_rules(rule):
    broken = rule(ALLOWED)
    assert not broken, f"{rule.__doc__}\nALLOWED breaks it: {broken}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    own = layer(module)
    bad = []
    for line, name in IMPORTS[module]:
        if name.split(".")[0] in ("bench", "tests", "conftest"):
            bad.append(f"{_where(module, line)}: imports {name} (the package never imports bench/ or tests/)")
            continue
        target = _known(name) if name.split(".")[0] == "hpcllm" else None
        if target is None:
            continue
        if layer(target) not in (own, *ALLOWED.get(own, ())):
            bad.append(f"{_where(module, line)}: imports {target} (layer {layer(target)!r})")
    assert not bad, (f"{module} (layer {own!r}) imports what its layer may not; {own!r} may import "
                     f"{sorted(ALLOWED.get(own, ()))} (ALLOWED in tests/test_layers.py):\n  " + "\n  ".join(bad))


def test_allowed_edges_are_used():
    """Keep ALLOWED honest: an edge no module uses is a rule loosened for nothing; take it out."""
    used = {(layer(m), layer(t)) for m, found in IMPORTS.items() for _, n in found
            if n.split(".")[0] == "hpcllm" and (t := _known(n)) is not None}
    unused = sorted((a, b) for a, bs in ALLOWED.items() for b in bs if (a, b) not in used)
    assert not unused, f"ALLOWED entries no import uses (remove them from tests/test_layers.py): {unused}"


def import_graph():
    """{module: {imported hpcllm module: first line}} over every import statement."""
    graph = {m: {} for m in MODULES}
    for m, found in IMPORTS.items():
        for line, name in found:
            target = _known(name) if name.split(".")[0] == "hpcllm" else None
            if target is not None and target != m:
                graph[m].setdefault(target, line)
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_cycle(graph, comp):
    """One shortest cycle through the first module of ``comp``, as [m0, m1, ..., m0]."""
    start, members = comp[0], set(comp)
    prev, todo = {start: None}, deque([start])
    while todo:
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w in members and w not in prev:
                prev[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for comp in found:
        path = _shortest_cycle(graph, comp)
        steps = "".join(f"\n    {a} -> {b}   ({_where(a, graph[a][b])})" for a, b in zip(path, path[1:]))
        lines.append(f"cycle among {comp}, e.g.:{steps}")
    assert not found, ("import cycles in hpcllm (every import statement counts, also inside functions; break each "
                       "by moving what both sides need into a leaf module):\n  " + "\n  ".join(lines))


def test_the_cycle_finder_reports_the_modules():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"f": 5}, "f": {"e": 6}}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert _shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
