"""Every row of the families' check tables (negkernels.cases) on the GPU, on each kernel backend
that implements its op: the table `negkernels check` prints, held as tests."""

import pytest
import torch

import negkernels as nk
from negkernels.cases import checks
from negkernels.check import TOLERANCE, run_row

ROWS = list(checks(torch.device("cuda")))  # closures only: nothing touches the device until a row runs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op, config, run", ROWS, ids=[f"{op}[{config}]" for op, config, _ in ROWS])
def test_check_row(op, config, run, backend):
    if backend not in nk.available_backends(torch.device("cuda"), op=op):
        pytest.skip(f"{backend} does not implement {op} here")
    assert run_row(run, backend) <= TOLERANCE
