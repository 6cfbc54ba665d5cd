"""Custom ops whose eager calls skip torch's dispatcher.

Every op of this package is a ``torch.library.custom_op``: that is what torch.compile, export,
FakeTensor shape propagation and ``torch.library.opcheck`` see. An eager call through the
dispatcher, though, costs about 40 µs of host time and another ~90 µs with autograd (torch
re-reads the op's schema argument by argument), more than the kernels of a small batch take.
So :func:`kernel_op` registers the custom op as usual and returns a :class:`KernelOp` that, for
an eager call on plain tensors, runs the same implementation directly (through a
``torch.autograd.Function`` built from the same ``setup_context`` and ``backward`` when the op
has a gradient). Anything else (tracing, fake or meta tensors, tensor subclasses, dispatch or
function modes, functorch transforms) goes through the registered op: one implementation, one
backward, two entrances.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _modes_active() -> bool:
    """Tracing, a dispatch or function mode, or a functorch transform: the dispatcher must run."""
    return bool(
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def plain_eager_call(args) -> bool:
    """True when ``args`` can skip the dispatcher without changing what the call does."""
    if _modes_active():
        return False
    for a in args:
        if isinstance(a, Tensor) and (type(a) is not Tensor or a.is_meta):
            return False
    return True


class KernelOp:
    """A registered custom op (``.op``) plus its direct eager entrance; call it like the op.

    A backward may check ``ctx.direct_call``: set on the direct entrance, whose callers in this
    package discard the outputs they do not return, so the backward may reuse such an output's
    storage (e.g. scale a gradient buffer in place) where the dispatcher's callers could still
    be holding it.
    """

    def __init__(self, op, impl: Callable, has_tensor_lists: bool):
        self.op = op
        self.impl = impl
        self._function: type | None = None
        self._differentiable: int | None = None  # leading arguments that may get a gradient; None: every one
        # autograd.Function does not track tensors inside list arguments: such ops keep the
        # dispatcher whenever they may need a gradient.
        self._has_tensor_lists = has_tensor_lists

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(
        self, backward: Callable, *, setup_context: Callable, differentiable: int | None = None
    ) -> None:
        """As ``custom_op.register_autograd``. ``differentiable``: only the first this many
        arguments can get a gradient (``backward`` returns theirs, through
        :func:`no_grads_after`); the direct entrance then hands autograd those and one tuple of
        the rest, since ``Function.apply`` walks each of its arguments on every call."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl
        self._differentiable = differentiable

        def finish(ctx, args, out):
            ctx.direct_call = True  # see KernelOp: the caller of this entrance never sees op outputs it discards
            # Outputs nobody differentiates get None, not a zero tensor each (every backward here
            # accepts None for such outputs).
            ctx.set_materialize_grads(False)
            setup_context(ctx, args, out)
            return tuple(out) if isinstance(out, list) else out

        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips
        # binding its arguments with inspect.signature on every call.
        if differentiable is None:

            def forward(ctx, *args):
                return finish(ctx, args, impl(*args))
        else:

            def forward(ctx, *args):
                args = (*args[:-1], *args[-1])
                return finish(ctx, args, impl(*args))

        self._function = type(
            self.op._name.replace("::", "_"),
            (torch.autograd.Function,),
            dict(forward=staticmethod(forward), backward=staticmethod(backward)),
        )

    def __call__(self, *args):
        if _modes_active():
            return self.op(*args)
        needs_grad = others_need_grad = False
        k = self._differentiable
        for i, a in enumerate(args):  # plain_eager_call's test and the gradient test in one pass
            if isinstance(a, Tensor):
                if type(a) is not Tensor or a.is_meta:
                    return self.op(*args)
                if a.requires_grad:
                    if k is None or i < k:
                        needs_grad = True
                    else:
                        others_need_grad = True
        if self._function is None or not torch.is_grad_enabled() or not (needs_grad or others_need_grad):
            return self.impl(*args)  # no gradient to track: no autograd node
        if self._has_tensor_lists or not needs_grad:
            # Only arguments without a gradient require one: the registered op still makes the
            # node its outputs hang from (their gradients are None), as a user's backward expects.
            return self.op(*args)
        if k is None:
            return self._function.apply(*args)
        return self._function.apply(*args[:k], args[k:])


def bounded_memo(cache: dict, key, make: Callable[[], object], limit: int):
    """``cache[key]``, made by ``make()`` on a miss. A cache holding ``limit`` entries is emptied
    first, so a caller that keeps asking for new keys (a schedule of temperatures) keeps only the
    newest few. For the eager host paths; a traced call builds its own value."""
    found = cache.get(key)
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = make()
    return found


def config_of(cls: type, config, options: dict, cache: dict, default=None):
    """An options object's ``of``: ``config`` (an instance of ``cls``) or one built from the keyword
    ``options`` (not both); equal options share one validated instance, kept in ``cache``, and no
    options give ``default`` when there is one."""
    if config is not None:
        if options:
            raise TypeError(f"config: give the options in the config or as keywords, not both (got {sorted(options)})")
        if not isinstance(config, cls):
            raise TypeError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
        return config
    if not options and default is not None:
        return default
    if torch.compiler.is_compiling():
        return cls(**options)
    try:
        key = tuple(sorted((k, type(v), v) for k, v in options.items()))
        hash(key)
    except TypeError:  # an unhashable value: the constructor names it
        return cls(**options)
    return bounded_memo(cache, key, lambda: cls(**options), 256)


def no_grads_after(ctx, *grads) -> tuple:
    """A backward's result: ``grads`` for the op's first inputs, then None for each other input."""
    return (*grads, *([None] * (len(ctx.needs_input_grad) - len(grads))))


def kernel_op(name: str, *, mutates_args) -> Callable[[Callable], KernelOp]:
    """``torch.library.custom_op(name, mutates_args=...)`` returning a :class:`KernelOp`."""

    def wrap(fn: Callable) -> KernelOp:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        lists = any(str(a.type) in ("List[Tensor]", "List[Optional[Tensor]]") for a in op._opoverload._schema.arguments)
        return KernelOp(op, fn, lists)

    return wrap
