"""The comm layer (hpcllm.world.comm): in-place all-reduce sum / max over real
`mpiexec -n 2` and `-n 3` worlds, with both backends (mpi4py and
torch.distributed gloo), on float32, bfloat16 and int64, contiguous and
strided inputs, and the seconds / calls counters the timing report reads."""

import os

import numpy as np
import pytest
import torch

from conftest import REPO, mpirun
from hpcllm.world.comm import LocalComm

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "comm_allreduce.py")
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
