"""Checks of negkernels.integrations.lightly against the real lightly package, run as a script.

lightly imports torchvision when it is imported. The torchvision wheels on PyPI for Linux x86_64
are CUDA builds: beside a CPU build of torch their C++ operators do not load, and torchvision
1) then fails at import, registering a fake kernel for ``torchvision::nms``, an operator its
failed library would have defined. The schemas of the two operators it registers that way are
defined here before the import, so the real torchvision Python package and the real lightly load;
no torchvision operator is called by the losses checked. A CUDA or matching CPU build of
torchvision needs none of this (the definitions are skipped when the operators exist).

Usage: python -m tests.peers.lightly_checks CHECK [BACKEND]; exits non-zero on a failed check.
"""

from __future__ import annotations

import sys

import torch


def _load_lightly():
    if not hasattr(torch.ops, "torchvision") or not hasattr(torch.ops.torchvision, "nms"):
        try:
            import torchvision  # noqa: F401  (a build whose operators load needs nothing else)
        except RuntimeError:
            for name in [m for m in sys.modules if m.startswith("torchvision")]:
                del sys.modules[name]
            global _SCHEMAS
            _SCHEMAS = torch.library.Library("torchvision", "DEF")
            _SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import lightly
    from lightly.loss import NTXentLoss

    assert lightly.__version__.startswith("1.6"), lightly.__version__
    return NTXentLoss


def _close(a, b, tol, what):
    """|a − b| ≤ tol·max(1, max|b|). Losses come back in float32 whatever the inputs' dtype, so a
    float64 check compares them at float32's resolution (``LOSS``) and the gradients at ``tol``."""
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(b.double().abs().max().item(), 1e-30) if b.numel() else 1.0
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3e} (scale {scale:.3e}, tolerance {tol})"


LOSS = 1.2e-7  # float32 rounding of a loss


def _views(batch, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype),
        torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype),
    )


def check_simclr(backend):
    from negkernels.integrations.lightly import NTXentLoss as Ours

    Theirs = _load_lightly()
    dtype, tol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 2e-5)
    for batch, dim, tau in ((7, 5, 0.5), (16, 33, 0.1), (1, 4, 0.3)):
        a, b = _views(batch, dim, dtype, batch)
        results = []
        for cls in (Theirs, Ours):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            kw = {} if cls is Theirs else dict(backend=backend)
            loss = cls(temperature=tau, **kw)(x, y)
            loss.backward()
            results.append((loss, x.grad, y.grad))
        for what, got, want in zip(("loss", "d out0", "d out1"), results[1], results[0]):
            _close(got, want, max(tol, LOSS) if what == "loss" else tol, f"SimCLR B={batch} {what}")


def check_memory_bank(backend):
    from negkernels.integrations.lightly import NTXentLoss as Ours

    Theirs = _load_lightly()
    dtype, tol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 2e-5)
    size, dim, batch = 12, 6, 4  # a multiple of the batch: lightly's bank is then a ring buffer too
    theirs = Theirs(temperature=0.2, memory_bank_size=(size, dim))
    theirs.memory_bank.bank = theirs.memory_bank.bank.to(dtype)
    ours = Ours(temperature=0.2, memory_bank_size=(size, dim), bank_dtype=dtype, backend=backend)
    # start both from lightly's random unit keys
    ours.memory_bank.buffer.copy_(theirs.memory_bank.bank)
    for step in range(5):
        a, b = _views(batch, dim, dtype, 100 + step)
        results = []
        for loss_fn in (theirs, ours):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            loss = loss_fn(x, y)
            loss.backward()
            results.append((loss, x.grad, y.grad))
        for what, got, want in zip(("loss", "d out0", "d out1"), results[1], results[0]):
            _close(got, want, max(tol, LOSS) if what == "loss" else tol, f"bank step {step} {what}")
        _close(
            ours.memory_bank.buffer,
            theirs.memory_bank.bank,
            1e-15 if dtype == torch.float64 else 1e-6,
            f"bank contents after step {step}",
        )
    # Without a gradient (evaluation) neither bank moves.
    before = ours.memory_bank.buffer.clone()
    with torch.no_grad():
        a, b = _views(batch, dim, dtype, 7)
        _close(ours(a, b), theirs(a, b), max(tol, LOSS), "no-grad loss")
    assert torch.equal(before, ours.memory_bank.buffer), "a no-grad call changed the bank"
    _close(ours.memory_bank.buffer, theirs.memory_bank.bank, 1e-6, "bank after a no-grad call")


def check_ring_buffer_differs_as_documented(backend):
    from negkernels.integrations.lightly import NTXentLoss as Ours

    Theirs = _load_lightly()
    size, dim, batch = 10, 3, 4  # not a multiple: lightly drops keys, negkernels keeps every one
    theirs = Theirs(memory_bank_size=(size, dim))
    ours = Ours(memory_bank_size=(size, dim), backend=backend)
    keys = []
    for step in range(3):
        a, b = _views(batch, dim, torch.float32, 200 + step)
        theirs(a.clone().requires_grad_(), b)
        ours(a.clone().requires_grad_(), b)
        keys.append(torch.nn.functional.normalize(b, dim=1))
    keys = torch.cat(keys)  # 12 keys in a bank of 10: slots 0, 1 hold keys 10, 11
    expected = torch.cat([keys[10:], keys[2:10]])
    _close(ours.memory_bank.buffer, expected, 1e-6, "negkernels' ring buffer")
    lightly_bank = theirs.memory_bank.bank
    # lightly wrote keys 0-3, 4-7, then 8, 9 and reset its pointer, dropping keys 10 and 11
    _close(lightly_bank, keys[:10], 1e-6, "lightly's bank")


def check_moco_against_lightly(backend):
    from negkernels.integrations.lightly import MoCoLoss

    Theirs = _load_lightly()
    size, dim, batch = 8, 5, 4
    theirs = Theirs(temperature=0.2, memory_bank_size=(size, dim))
    theirs.memory_bank.bank = theirs.memory_bank.bank.double()
    ours = MoCoLoss(size, dim, temperature=0.2, bank_init="random", dtype=torch.float64, backend=backend)
    ours.queue.buffer.copy_(theirs.memory_bank.bank)
    tol = 1e-12 if backend == "reference" else 2e-5
    for step in range(4):
        q, k = _views(batch, dim, torch.float64, 300 + step)
        if backend != "reference":
            q, k = q.float(), k.float()  # the queue stays float64; its keys are cast on read
        x1, x2 = q.clone().requires_grad_(), q.clone().requires_grad_()
        want = theirs(x1.double(), k.double())  # the key has no gradient: lightly's MoCo recipe
        got = ours(x2, k)
        want.backward()
        got.backward()
        _close(got, want, max(tol, LOSS), f"MoCo step {step} loss")
        _close(x2.grad, x1.grad, tol if backend == "reference" else 1e-4, f"MoCo step {step} d query")


if __name__ == "__main__":
    check, backend = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "reference"
    globals()[f"check_{check}"](backend)
    print(f"ok {check} {backend}")
