"""The comm layer (hpcllm.world.comm): in-place all-reduce sum / max over real
`mpiexec -n 2` and `-n 3` worlds, with both backends (mpi4py and
torch.distributed gloo), on float32, bfloat16 and int64, contiguous and
strided inputs, and the seconds / calls counters the timing report reads.
Also the agreeing helpers (hpcllm.world.collective) over a world of 3 and
alone, and the launcher detection (hpcllm.world.launch)."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, mpirun
from hpcllm.errors import HpcllmError
from hpcllm.world import collective
from hpcllm.world.comm import LocalComm
from hpcllm.world.launch import launched_world, launcher_size

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "comm_allreduce.py")
AGREE_SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "world_agree.py")
BACKENDS = ("mpi", "torch")
CASES = ["f32_sum", "f32_max", "bf16_sum", "bf16_max", "i64_sum", "i64_max",
         "f32_strided_sum", "bf16_strided_sum", "i64_strided_max"]
# the elements each strided case reduces, as an index into the saved base tensor
VIEWS = {"f32_strided_sum": lambda b: b.T[1:, ::2], "bf16_strided_sum": lambda b: b[::2, 1:5],
         "i64_strided_max": lambda b: b[:, ::3]}


@pytest.fixture(scope="module", params=[2, 3])
def reduced(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"comm{n}") / "out.npz"
    mpirun(n, [SCRIPT, out, ",".join(BACKENDS)], python_module="mpi4py", timeout=180)
    return n, dict(np.load(out))


def _expected(ins, case):
    stack = np.stack(ins)
    if case.endswith("sum"):
        return stack.sum(0)
    return stack.max(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_all_reduce(reduced, backend, case):
    n, got = reduced
    ins = [got[f"in_{backend}_{case}_r{r}"] for r in range(n)]
    for r in range(n):
        out = got[f"out_{backend}_{case}_r{r}"]
        assert got[f"same_{backend}_{case}_r{r}"], "all_reduce returns the tensor it reduced in place"
        if case in VIEWS:  # only the view's elements change; the rest of the base keeps this rank's values
            view = VIEWS[case]
            want = ins[r].copy()
            view(want)[...] = _expected([view(x) for x in ins], case)
        else:
            want = _expected(ins, case)
        if case.startswith("f32") and case.endswith("sum"):  # summation order is the library's
            np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
        else:  # max, integers, and bf16 sums of small integers are exact
            assert out.dtype == want.dtype and np.array_equal(out, want), f"rank {r}: {out} != {want}"
        if case.startswith("i64"):
            assert out.min() >= 1 << 40 and np.array_equal(out % 1000, want % 1000)  # no float32 rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_counters(reduced, backend):
    n, got = reduced
    for r in range(n):
        assert int(got[f"calls_{backend}_r{r}"]) == len(CASES)
        assert float(got[f"seconds_{backend}_r{r}"]) >= float(got[f"waited_{backend}_r{r}"]) > 0
        if r > 0:  # these ranks waited for rank 0's 0.3 s sleep inside the collective
            assert float(got[f"waited_{backend}_r{r}"]) >= 0.2


def test_local_comm_is_identity_and_counts_nothing():
    comm = LocalComm()
    t = torch.arange(6.0).view(2, 3).t()
    assert comm.all_reduce(t, "max") is t and torch.equal(t, torch.arange(6.0).view(2, 3).t())
    assert (comm.calls, comm.seconds, comm.size, comm.rank) == (0, 0.0, 1, 0)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="'min'"):
        LocalComm().all_reduce(torch.ones(2), op="min")


def test_agreeing_over_a_world_of_three(tmp_path):
    out = tmp_path / "agree.json"
    mpirun(3, [AGREE_SCRIPT, out], python_module="mpi4py", timeout=120)
    ranks = json.loads(out.read_text())
    inputs = np.array([r["input"] for r in ranks])
    for r, got in enumerate(ranks):
        assert (got["max"], got["max_float"], got["any_last"], got["any_none"]) == (10, 2.5, True, False)
        assert got["root"] == "from 0" and got["gathered"] == [0, 1, 4]
        assert got["sum_bits"] == ranks[0]["sum_bits"], f"rank {r} got other bits of the sum than rank 0"
        np.testing.assert_allclose(got["sum"], inputs.sum(0), rtol=1e-12)
        assert got["max_all"] == [2, 0] and got["min_all"] == [0, -2]
        assert got["agree_error_none"] is None
        assert got["agree_error"] == "bad input on rank 1"          # the lowest failing rank's, on every rank
        assert got["every_rank_ok"] == r + 1
        assert got["every_rank_error"] == "disk full on rank 2"
        assert got["root_ok"] == "computed on 0"
        assert got["root_error"] == "disk full on rank 0"


def test_agreeing_alone_needs_no_mpi():
    c = collective
    assert (c.agree_max(None, 3), c.agree_any(None, 0), c.from_root(None, "x")) == (3, False, "x")
    assert c.gather_all(None, 5) == [5]
    a = np.arange(4.0)[::2]
    for fn in (c.sum_all, c.max_all, c.min_all):
        out = fn(None, a)
        assert np.array_equal(out, a) and out.flags.c_contiguous and out is not a
    assert c.on_every_rank(None, lambda: 7) == 7 and c.on_root(None, lambda: 8) == 8
    with pytest.raises(HpcllmError, match="^no space$"):
        c.on_root(None, lambda: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(HpcllmError, match="^bad$"):
        c.agree_error(None, "bad")


@pytest.mark.parametrize("env, size", [
    ({}, None), ({"PMI_SIZE": "4", "PMI_RANK": "1"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
    ({"PMIX_SIZE": "1"}, 1), ({"PMIX_RANK": "0"}, 0), ({"MPI_LOCALNRANKS": "2"}, 0),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, None),     # Slurm alone is not an MPI launch
])
def test_launcher_size(env, size):
    assert launcher_size(env) == size


def test_launched_world_is_none_without_a_launcher_of_several_ranks():
    assert launched_world({}) is None and launched_world({"PMI_SIZE": "1", "PMI_RANK": "0"}) is None
