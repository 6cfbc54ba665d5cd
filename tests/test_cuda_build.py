"""The CUDA sources compile with nvcc for sm_90 against the installed torch's headers, and the
whole extension builds, imports and checks its arguments (no GPU needed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from negkernels import _cuda_ext

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) on this machine")
CU_FILES = sorted((_cuda_ext.SOURCE_ROOT / "csrc").glob("*.cu"))


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ has no .cu files"


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_file_compiles_for_sm90(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{source.parent}"]
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O2",
        "-arch=sm_90",
        "-Werror",
        "all-warnings",
        *includes,
        str(source),
        "-o",
        str(tmp_path / "out.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    if NVCC is None or shutil.which("cmake") is None:
        pytest.skip("building the extension needs nvcc and cmake")
    cache = tmp_path_factory.mktemp("ext-cache")
    old = os.environ.get("NEGKERNELS_CACHE_DIR")
    os.environ["NEGKERNELS_CACHE_DIR"] = str(cache)
    try:
        path = _cuda_ext.build(cuda_archs="90")
    finally:
        if old is None:
            os.environ.pop("NEGKERNELS_CACHE_DIR")
        else:
            os.environ["NEGKERNELS_CACHE_DIR"] = old
    return _cuda_ext.import_module_from(path)


@pytest.mark.slow
def test_extension_builds_and_registers_ops(extension):
    assert "group_advantages" in extension.implemented_ops()
    assert hasattr(torch.ops.negkernels_cuda, "group_advantages")


@pytest.mark.slow
def test_extension_checks_arguments(extension):
    op = torch.ops.negkernels_cuda.group_advantages
    base = dict(
        group_size=4,
        num_groups=2,
        estimator=0,
        scale=0,
        eps=1e-6,
        virtual_max_reward=1.0,
        num_virtual=1.0,
        positive_scale=1.0,
        negative_scale=1.0,
        positive_scale_tensor=None,
        negative_scale_tensor=None,
        batch_stats=None,
        headroom=5,
        vmax_exponent=-126,
        stream=0,
    )
    with pytest.raises(RuntimeError, match="rewards: the CUDA kernel needs a CUDA tensor"):
        op(torch.randn(8), None, **base)
    if not torch.cuda.is_available():
        return
    r = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match="group_size"):
        op(r, None, **{**base, "group_size": 3})
    with pytest.raises(RuntimeError, match="group_index"):
        op(r, torch.zeros(7, dtype=torch.long, device="cuda"), **base)
    with pytest.raises(RuntimeError, match="estimator"):
        op(r, None, **{**base, "estimator": 9})


def test_build_key_tracks_sources():
    key = _cuda_ext.build_key("90")
    assert key == _cuda_ext.build_key("90") and key != _cuda_ext.build_key("80")
    assert Path(_cuda_ext.SOURCE_ROOT / "CMakeLists.txt").is_file()


@pytest.mark.slow
def test_extension_checks_policy_loss_arguments(extension):
    assert "policy_loss" in extension.implemented_ops()
    op = torch.ops.negkernels_cuda.policy_loss
    from negkernels.ops.logprobs import PolicyKernelCodes, PolicyLossConfig

    codes, scalars = PolicyLossConfig().kernel_args(
        use_kl=False,
        use_is=False,
        adv_per_token=False,
        iw_per_token=False,
        compute_grad=True,
        num_sequences=2,
        seq_len=3,
        max_len=3,
        norm_constant=1.0,
    )

    def changed(**fields):
        return list(PolicyKernelCodes(*codes)._replace(**fields))

    x = torch.randn(6)
    with pytest.raises(RuntimeError, match="logp: the CUDA kernel needs a CUDA tensor"):
        op(x, x, torch.randn(2), None, None, None, None, codes, scalars, 0)
    if not torch.cuda.is_available():
        return
    x = x.cuda()
    with pytest.raises(RuntimeError, match="codes: expected"):
        op(x, x, torch.randn(2, device="cuda"), None, None, None, None, codes[:-1], scalars, 0)
    with pytest.raises(RuntimeError, match="scalars: expected"):
        op(x, x, torch.randn(2, device="cuda"), None, None, None, None, codes, scalars + [0.0], 0)
    with pytest.raises(RuntimeError, match="advantages"):
        op(x, x, torch.randn(3, device="cuda"), None, None, None, None, codes, scalars, 0)
    with pytest.raises(RuntimeError, match="seq_len"):
        op(x, x, torch.randn(2, device="cuda"), None, None, None, None, changed(seq_len=4), scalars, 0)
    with pytest.raises(RuntimeError, match="ref_logp"):
        op(x, x, torch.randn(2, device="cuda"), None, None, None, None, changed(kl=2), scalars, 0)


@pytest.mark.slow
def test_extension_checks_select_retained_arguments(extension):
    assert {"select_retained", "evict"} <= set(extension.implemented_ops())
    op = torch.ops.negkernels_cuda.select_retained
    with pytest.raises(RuntimeError, match="scores: the CUDA kernel needs a CUDA tensor"):
        op(torch.randn(2, 3, 10), None, None, None, 0, 4, 0, 0, None, 0)
    with pytest.raises(RuntimeError, match="give exactly one"):
        op(None, None, None, None, 0, 4, 0, 0, None, 0)
    if not torch.cuda.is_available():
        return
    scores = torch.randn(2, 3, 10, device="cuda")
    with pytest.raises(RuntimeError, match="sink \\+ window"):
        op(scores, None, None, None, 0, 4, 3, 2, None, 0)
    with pytest.raises(RuntimeError, match="lengths"):
        op(scores, None, None, None, 0, 4, 0, 0, torch.ones(3, dtype=torch.long, device="cuda"), 0)
    with pytest.raises(RuntimeError, match="positions"):
        op(None, scores, None, None, 7, 4, 0, 0, None, 0)


@pytest.mark.slow
def test_extension_poisons_its_outputs_under_the_test_harness(extension):
    from .helpers import poisoned_allocations

    make = torch.ops.negkernels_cuda._output_for_test
    with poisoned_allocations():
        assert make([5], torch.float32).isnan().all()
        assert (make([3], torch.int64) == -987654321).all()
    assert "NEGKERNELS_POISON_OUTPUTS" not in os.environ
