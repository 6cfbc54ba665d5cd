"""Every row of the families' check tables (negkernels.cases) on the GPU, on each kernel backend
that implements its op: the table `negkernels check` prints, held as tests."""

import pytest
import torch

from negkernels import _cuda_ext
from negkernels._backend import IMPLEMENTED
from negkernels.cases import checks
from negkernels.check import TOLERANCE, run_row

ROWS = list(checks(torch.device("cuda")))  # closures only: nothing touches the device until a row runs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op, config, run", ROWS, ids=[f"{op}[{config}]" for op, config, _ in ROWS])
def test_check_row(op, config, run, backend):
    if backend not in IMPLEMENTED[op]:
        pytest.skip(f"{op} has no {backend} kernel")  # true on every machine: nothing to run
    if backend == "cuda" and not _cuda_ext.has_cuda_ext():
        pytest.skip(f"the CUDA extension is not loaded: {_cuda_ext.load_error()}")
    assert run_row(run, backend) <= TOLERANCE
