"""pytest-benchmark suite over the same cases as `negkernels bench`:

pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from negkernels.cases import CASES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [(c, impl) for c in CASES for impl in ("eager", "compile", "triton", "cuda")]


@pytest.mark.parametrize("case, impl", PARAMS, ids=[f"{c.id}-{i}" for c, i in PARAMS])
def test_case(benchmark, case, impl):
    inputs = case.build(DEVICE, DEVICE.type == "cuda")
    impls = case.implementations(inputs)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {DEVICE.type} here")
    fn = impls[impl]
    fn()

    def timed():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["shape"] = case.shape(inputs)
    benchmark.extra_info["min_bytes"] = case.min_bytes(inputs)
    benchmark(timed)
