"""The package's layers: data flows corpus -> tokens -> batches -> model -> results, never back.

Read from the source (every import statement, also those inside functions):
a lower layer never imports a higher one, the package imports nothing from
bench/ or tests/, and module-level imports have no cycle.
"""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hpcllm")

# layer -> layers it must not import (anything under hpcllm.<name>)
FORBIDDEN = {
    "corpus": ("store", "executor", "jobs", "model", "analysis", "train", "checkpoint", "world"),
    "tokenizer": ("corpus", "store", "executor", "jobs", "model", "analysis", "train", "checkpoint", "world"),
    "kernels": ("corpus", "store", "executor", "jobs", "model", "analysis", "train", "checkpoint", "world",
                "tokenizer"),
    "model": ("jobs", "executor", "store", "analysis", "corpus", "train"),
    "checkpoint": ("jobs", "executor", "analysis", "corpus", "train"),
    "world": ("jobs", "executor", "store", "analysis", "corpus", "model", "checkpoint", "train"),
    "store": ("jobs", "executor", "analysis", "train", "model"),
    "executor": ("jobs", "analysis"),
    "analysis": ("jobs", "executor", "model"),
}


def _modules():
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path
    kernels = os.path.join(os.path.dirname(PKG), "kernels")
    for name in os.listdir(kernels):
        if name.endswith(".py"):
            yield "hpcllm.kernels." + name[:-3].removesuffix("__init__").rstrip("."), os.path.join(kernels, name)


def _imports(path, top_level_only=False):
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


MODULES = dict(_modules())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    layer = module.split(".")[1] if module.count(".") else ""
    bad = [imp for imp in _imports(MODULES[module])
           if imp.split(".")[0] in ("bench", "tests", "conftest")
           or (imp.startswith("hpcllm.") and imp.split(".")[1] in FORBIDDEN.get(layer, ()))]
    assert not bad, f"{module} imports {bad}"


def test_no_import_cycle():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
