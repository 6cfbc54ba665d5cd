"""Every Triton kernel variant compiles to sm_90 machine code (Triton's own ptxas; no GPU needed).

The interpreter checks the arithmetic; this checks what the interpreter cannot: that the real
code generator accepts each kernel (types, scalar atomics, loops with runtime bounds). It runs in
a subprocess because the test session may have set TRITON_INTERPRET=1, which turns every
``triton.jit`` function into an interpreted one at import.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from negkernels.triton import advantages as adv

    TARGET = GPUTarget("cuda", 90, 32)
    POINTERS = {"work_ptr": "*i64", "barrier_ptr": "*i32", "count_ptr": "*i64", "group_index_ptr": "*i64",
                "batch_stats_ptr": "*fp64"}
    INTS = {"n_rewards", "num_groups", "group_size", "headroom", "vmax_exponent"}

    def compile_variant(kernel, constexprs, num_warps):
        # Triton turns integer arguments equal to 1 into constants: names in constexprs that are
        # not upper case stand for such a specialised launch.
        names = kernel.arg_names
        signature = {}
        for name in names:
            if name.isupper() or name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = POINTERS.get(name, "*fp32")
            else:
                signature[name] = "i32" if name in INTS else "fp64"
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
        assert "ld.global" in compiled.asm["ptx"]

    count = 0
    for est, scale in itertools.product(range(5), range(4)):
        for uniform, external, per_sample in [(True, False, False), (False, scale in (1, 3), True)]:
            compile_variant(adv._group_advantages_segmented_kernel,
                            dict(ESTIMATOR=est, SCALE=scale, UNIFORM=uniform, PER_SAMPLE_SIGN_SCALES=per_sample,
                                 EXTERNAL_BATCH_STATS=external, BLOCK=1024), 8)
            count += 1
        if scale in (0, 2):
            for block_g, gpp in [(8, 64), (4096, 1)]:
                compile_variant(adv._group_advantages_uniform_kernel,
                                dict(ESTIMATOR=est, SCALE=scale, PER_SAMPLE_SIGN_SCALES=est == 1,
                                     GROUPS_PER_PROGRAM=gpp, BLOCK_G=block_g), 8)
                count += 1
    ones = dict(n_rewards=1, num_groups=1, group_size=1, headroom=1, vmax_exponent=1)
    compile_variant(adv._group_advantages_segmented_kernel,
                    dict(ESTIMATOR=3, SCALE=3, UNIFORM=True, PER_SAMPLE_SIGN_SCALES=False, EXTERNAL_BATCH_STATS=False,
                         BLOCK=1024, **ones), 8)
    compile_variant(adv._group_advantages_uniform_kernel,
                    dict(ESTIMATOR=0, SCALE=0, PER_SAMPLE_SIGN_SCALES=False, GROUPS_PER_PROGRAM=64, BLOCK_G=1,
                         group_size=1, num_groups=1), 4)
    count += 2
    print("compiled", count)
    """
)


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 62" in proc.stdout
