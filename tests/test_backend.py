"""Backend selection: explicit argument > NEGKERNELS_BACKEND > automatic; never a silent fallback."""

import pytest
import torch

import negkernels as nk
from negkernels._backend import resolve_backend


def test_available_backends_on_cpu():
    backends = nk.available_backends("cpu")
    assert backends[0] == "reference"
    assert "cuda" not in backends
    assert ("triton" in backends) == (nk._backend.has_triton() and nk._backend.triton_interpret())


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("NEGKERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert (
        resolve_backend(None, torch.device("cpu"), "group_advantages", ("reference", "triton", "cuda")) == "reference"
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "triton" if nk._backend.has_triton() else "reference"
    assert resolve_backend(None, torch.device("cpu"), "group_advantages", ("reference", "triton", "cuda")) == expected


def test_environment_default(monkeypatch):
    monkeypatch.setenv("NEGKERNELS_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu"), "group_advantages", ("reference", "triton")) == "reference"
    monkeypatch.setenv("NEGKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(None, torch.device("cpu"), "group_advantages", ("reference",))


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(nk.BackendUnavailable, match="triton"):
        resolve_backend("triton", torch.device("cpu"), "group_advantages", ("reference", "triton", "cuda"))
    with pytest.raises(nk.BackendUnavailable, match="CUDA tensors"):
        nk.group_advantages(torch.randn(4), group_size=2, backend="cuda")
    with pytest.raises(nk.BackendUnavailable, match="no triton implementation"):
        resolve_backend("triton", torch.device("cpu"), "op", ("reference",))


def test_disabled_extension_does_not_break_import(monkeypatch):
    from negkernels import _cuda_ext

    monkeypatch.setenv("NEGKERNELS_DISABLE_CUDA_EXT", "1")
    monkeypatch.setattr(_cuda_ext, "_state", {"module": None, "error": None, "tried": False})
    assert _cuda_ext.load() is None
    assert "NEGKERNELS_DISABLE_CUDA_EXT" in _cuda_ext.load_error()
    assert not nk.has_cuda_ext()


def test_cpu_torch_never_builds_on_first_use(monkeypatch, tmp_path):
    from negkernels import _cuda_ext

    monkeypatch.delenv("NEGKERNELS_DISABLE_CUDA_EXT", raising=False)
    monkeypatch.setenv("NEGKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cuda_ext, "_state", {"module": None, "error": None, "tried": False})
    if torch.version.cuda is None:
        assert _cuda_ext.load() is None
        assert "not built" in _cuda_ext.load_error()
        assert not any(tmp_path.iterdir())


def test_launch_arithmetic_matches_triton():
    # The launchers' grid arithmetic is plain Python; it must agree with Triton's own helpers.
    import triton  # a declared dependency: CI installs it

    from negkernels.triton import cdiv, next_power_of_2

    for n in [0, 1, 2, 3, 5, 16, 17, 1000, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing: the ops then take the dispatcher's entrance."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _policy_and_nce_grads(entrance_mode):
    torch.manual_seed(11)
    logp = torch.randn(3, 7, requires_grad=True)
    old = torch.randn(3, 7, requires_grad=True)  # not differentiable: a constant on both entrances
    adv, mask = torch.randn(3), torch.rand(3, 7) > 0.3
    query = torch.randn(5, 12, requires_grad=True)
    positive, bank = torch.randn(5, 12, requires_grad=True), torch.randn(19, 12, requires_grad=True)
    tau = torch.tensor(0.2, requires_grad=True)
    with entrance_mode():
        loss = nk.policy_loss(logp, old, adv, mask, backend="triton").loss
        nce = nk.bank_info_nce(query, positive, bank, temperature=tau, backend="triton")
    (loss + nce).backward()
    return [loss.detach(), nce.detach(), logp.grad, old.grad, query.grad, positive.grad, bank.grad, tau.grad]


def test_direct_and_dispatcher_entrances_agree():
    """The direct eager entrance hands autograd only the leading arguments that can get a gradient;
    its values and gradients equal the registered op's, bit for bit, and a tensor argument outside
    those (old_logp) gets no gradient on either entrance."""
    import contextlib

    direct = _policy_and_nce_grads(contextlib.nullcontext)
    dispatched = _policy_and_nce_grads(_PassThroughMode)
    for name, a, b in zip(
        ["loss", "nce", "d logp", "d old_logp", "d query", "d positive", "d bank", "d tau"], direct, dispatched
    ):
        if name == "d old_logp":
            assert a is None and b is None, name
            continue
        assert a is not None and torch.equal(a, b), name


def test_an_op_whose_only_grad_requiring_input_gets_no_gradient_still_backpropagates():
    """old_logp requires grad, logp does not: both entrances give a loss that backpropagates
    (to no gradient), as the registered op does."""
    import contextlib

    for mode in (contextlib.nullcontext, _PassThroughMode):
        old = torch.randn(2, 5, requires_grad=True)
        with mode():
            loss = nk.policy_loss(torch.randn(2, 5), old, torch.randn(2), backend="triton").loss
            fused = nk.policy_loss_from_logits(
                torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5)), old, torch.randn(2), backend="triton"
            ).loss
        assert loss.requires_grad and fused.requires_grad
        (loss + fused).backward()
        assert old.grad is None
