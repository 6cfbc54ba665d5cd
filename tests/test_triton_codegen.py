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

PRELUDE = textwrap.dedent(
    """
    import itertools
    import os
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TARGET = GPUTarget("cuda", 90, 32)
    # The script runs as SHARDS processes at once (_compile_in_subprocess); each compiles every
    # SHARDS-th variant, in the order the script asks for them, and counts them all.
    SHARD = int(os.environ.get("NEGKERNELS_CODEGEN_SHARD", "0"))
    SHARDS = int(os.environ.get("NEGKERNELS_CODEGEN_SHARDS", "1"))
    VARIANTS = itertools.count()
    # sm_90's per-block limits: a launch that asks for more fails with OutOfResources / "too many
    # resources requested", which only a GPU would otherwise show.
    SHARED_LIMIT = 232448
    REGISTER_FILE = 65536
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def check_resources(kernel, compiled, num_warps):
        shared = compiled.metadata.shared
        assert shared <= SHARED_LIMIT, f"{kernel.__name__}: {shared} B of shared memory > {SHARED_LIMIT}"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        regs = int(usage.split("REG:")[1].split()[0])
        threads = 32 * num_warps
        assert regs * threads <= REGISTER_FILE, f"{kernel.__name__}: {regs} registers x {threads} threads"
        return shared, regs

    def compile_variant(kernel, constexprs, num_warps, pointers, ints, int_type):
        # Triton turns integer arguments equal to 1 into constants: names in constexprs that are
        # not upper case stand for such a specialised launch. None: another shard compiles it.
        if next(VARIANTS) % SHARDS != SHARD:
            return None
        names = kernel.arg_names
        signature = {}
        for name in names:
            if name.isupper() or name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, "*fp32")
            else:
                # a *_scale argument multiplies fp32 values, as a Python float launches it (fp32)
                signature[name] = int_type if name in ints else "fp32" if name.endswith("_scale") or \
                    int_type != "i32" else "fp64"
        constexprs = {(names.index(k),): v for k, v in constexprs.items()}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
        assert "ld.global" in compiled.asm["ptx"]
        check_resources(kernel, compiled, num_warps)
        return compiled

    def assert_strides_scaled_in_64_bits(kernel, compiled):
        if compiled is None:
            return
        # An index times a stride in 32 bits wraps once the offset passes 2**31 (h·S·D for S = 1M,
        # D = 128, h >= 16): every scalar product with a stride argument must be 64-bit.
        import re
        strides = [n for n in kernel.arg_names if n.startswith(("stride_", "s_"))]
        for line in compiled.asm["ttir"].splitlines():
            if "arith.muli" in line and line.rstrip().split(" loc(")[0].endswith(": i32"):
                used = [n for n in strides if re.search(rf"%{n}(?![A-Za-z0-9_])", line)]
                assert not used, f"{kernel.__name__}: 32-bit product with {used}: {line.strip()}"
    """
)

SCRIPT = PRELUDE + textwrap.dedent(
    """
    from negkernels.triton import advantages as adv

    POINTERS = {"work_ptr": "*i64", "barrier_ptr": "*i32", "count_ptr": "*i64", "group_index_ptr": "*i64",
                "batch_stats_ptr": "*fp64"}
    INTS = {"n_rewards", "num_groups", "group_size", "headroom", "vmax_exponent"}

    def compile_advantages(kernel, constexprs, num_warps):
        compile_variant(kernel, constexprs, num_warps, POINTERS, INTS, "i32")

    count = 0
    for est, scale in itertools.product(range(5), range(4)):
        for uniform, external, per_sample in [(True, False, False), (False, scale in (1, 3), True)]:
            compile_advantages(adv._group_advantages_segmented_kernel,
                               dict(ESTIMATOR=est, SCALE=scale, UNIFORM=uniform, PER_SAMPLE_SIGN_SCALES=per_sample,
                                    EXTERNAL_BATCH_STATS=external, BLOCK=1024), 8)
            count += 1
        if scale in (0, 2):
            for block_g, gpp in [(8, 64), (4096, 1)]:
                compile_advantages(adv._group_advantages_uniform_kernel,
                                   dict(ESTIMATOR=est, SCALE=scale, PER_SAMPLE_SIGN_SCALES=est == 1,
                                        GROUPS_PER_PROGRAM=gpp, BLOCK_G=block_g), 8)
                count += 1
    ones = dict(n_rewards=1, num_groups=1, group_size=1, headroom=1, vmax_exponent=1)
    compile_advantages(adv._group_advantages_segmented_kernel,
                       dict(ESTIMATOR=3, SCALE=3, UNIFORM=True, PER_SAMPLE_SIGN_SCALES=False,
                            EXTERNAL_BATCH_STATS=False, BLOCK=1024, **ones), 8)
    compile_advantages(adv._group_advantages_uniform_kernel,
                       dict(ESTIMATOR=0, SCALE=0, PER_SAMPLE_SIGN_SCALES=False, GROUPS_PER_PROGRAM=64, BLOCK_G=1,
                            group_size=1, num_groups=1), 4)
    count += 2
    disco_pointers = {"scores_ptr": "*bf16", "correct_ptr": "*u8", "ids_ptr": "*i64", "work_ptr": "*fp64",
                      "barrier_ptr": "*i32"}
    for disco, weighted in itertools.product((True, False), (True, False)):
        compile_variant(adv._group_discriminative_kernel, dict(DISCO=disco, HAS_WEIGHTS=weighted, BLOCK=1024), 8,
                        disco_pointers, {"n", "num_groups"}, "i64")
        count += 1
    print("compiled", count)
    """
)

LOGPROBS_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from negkernels.triton import logprobs as lk

    POINTERS = {"targets_ptr": "*i64", "cu_ptr": "*i32", "mask_ptr": "*u8", "logits_ptr": "*bf16", "grad_ptr": "*bf16"}
    INTS = {"stride_outer", "stride_inner", "inner_size", "grad_stride_outer", "grad_stride_inner", "n_vocab",
            "vocab_start", "vocab_total", "seq_len", "max_len", "n_rows", "rows_per_program", "n_tokens", "n_cols",
            "num_sequences"}

    def compile_logprobs(kernel, constexprs, num_warps=8, **pointers):
        compile_variant(kernel, constexprs, num_warps, {**POINTERS, **pointers}, INTS, "i64")

    count = 0
    for entropy in (False, True):
        compile_logprobs(lk._token_logprobs_fwd_kernel, dict(WITH_ENTROPY=entropy, BLOCK_V=4096))
        count += 1
    for grad_logp, grad_entropy in ((True, False), (True, True), (False, True)):
        compile_logprobs(lk._token_logprobs_bwd_kernel,
                         dict(HAS_GRAD_LOGP=grad_logp, HAS_GRAD_ENTROPY=grad_entropy, BLOCK_V=4096))
        count += 1
    base = dict(LOSS=0, KL=-1, KL_BIAS_CORRECTION=False, KL_TIMES_IS_WEIGHTS=False, AGG=0, IS=0, PACKED=False,
                HAS_MASK=True, ADV_PER_TOKEN=False, IW_PER_TOKEN=False,
                CISPO_TWO_SIDED=False, SEQUENCE_RATIO=False, COMPUTE_GRAD=True, HAS_NORMALISER=False, BLOCK=2048,
                FINAL_BLOCK=lk.FINAL_ROWS)
    variants = []
    from negkernels.reference.logprobs import LossType
    for loss in map(int, LossType):
        variants.append(dict(base, LOSS=loss, KL=2, AGG=2, IS=1, PACKED=True, IW_PER_TOKEN=True, CISPO_TWO_SIDED=True))
        variants.append(dict(base, LOSS=loss, AGG=4, IS=2, ADV_PER_TOKEN=True, HAS_MASK=False, COMPUTE_GRAD=False))
    variants += [dict(base, KL=kl) for kl in range(5)] + [dict(base, AGG=agg) for agg in (1, 3)]
    variants.append(dict(base, HAS_NORMALISER=True))
    variants.append(dict(base, LOSS=1, AGG=2, BLOCK=16, seq_len=1, max_len=1))
    # The bias-corrected KL: token ratio (ppo) and the sequence ratio's extra sweep (gspo).
    variants += [dict(base, LOSS=loss, KL=2, KL_BIAS_CORRECTION=True) for loss in (0, 1)]
    # sapo / cispo on the sequence ratio (TRL's sequence-level importance sampling), with its KL
    variants += [dict(base, LOSS=loss, SEQUENCE_RATIO=True, KL=2, KL_BIAS_CORRECTION=True, AGG=2) for loss in (2, 3)]
    # The KL term weighted by the rollout IS weights (verl's kl_cov), with gspo's sequence ratio too.
    variants += [dict(base, LOSS=loss, KL=3, IS=1, IW_PER_TOKEN=True, KL_BIAS_CORRECTION=loss == 1,
                      KL_TIMES_IS_WEIGHTS=True) for loss in (0, 1)]
    for v in variants:
        compile_logprobs(lk._policy_loss_fwd_kernel, v, logp_ptr="*fp32")
        count += 1
    fused = dict(LOSS=0, KL=-1, KL_BIAS_CORRECTION=False, KL_TIMES_IS_WEIGHTS=False, IS=0, CISPO_TWO_SIDED=False,
                 ON_POLICY=False, COMPUTE_GRAD=True, WITH_ENTROPY=False, FINALIZE=True,
                 HAS_WEIGHT=False, HAS_MASK=True, ADV_PER_TOKEN=False, IW_PER_TOKEN=False, NORMALISER=1, BLOCK_V=4096,
                 COUNT_BLOCK=lk.MASK_COUNT_BLOCK)
    for loss in (0, 2, 3, 4):
        compile_logprobs(lk._policy_loss_from_logits_kernel,
                         dict(fused, LOSS=loss, KL=loss % 5, IS=1 + loss % 2, CISPO_TWO_SIDED=loss == 2,
                              WITH_ENTROPY=loss % 2 == 0))
        count += 1
    for on_policy in (False, True):  # TRL's defaults: bias-corrected k3, on-policy when num_iterations = 1
        compile_logprobs(lk._policy_loss_from_logits_kernel,
                         dict(fused, KL=2, KL_BIAS_CORRECTION=True, ON_POLICY=on_policy, WITH_ENTROPY=True))
        count += 1
    compile_logprobs(lk._policy_loss_from_logits_kernel, dict(fused, KL=3, IS=1, KL_TIMES_IS_WEIGHTS=True))
    count += 1
    for dtype in ("*bf16", "*fp32"):
        compile_logprobs(lk._scale_rows_unless_one_kernel, dict(BLOCK=4096), x_ptr=dtype)
        count += 1
    for kl in range(-1, 5):
        compile_logprobs(lk._policy_loss_from_logits_kernel, dict(fused, KL=kl, COMPUTE_GRAD=kl != 2,
                                                                  FINALIZE=kl != 0, HAS_WEIGHT=kl == 1,
                                                                  HAS_MASK=kl != 3, ADV_PER_TOKEN=kl == 4,
                                                                  IW_PER_TOKEN=kl in (0, 4),
                                                                  NORMALISER=(kl + 1) % 3))
        count += 1
    for entropy in (False, True):
        compile_logprobs(lk._policy_loss_from_logits_kernel, dict(fused, WITH_ENTROPY=entropy,
                                                                  BLOCK_V=lk.FUSED_MAX_BLOCK_V),
                         num_warps=lk.FUSED_NUM_WARPS)
        count += 1
    ones = dict(stride_outer=1, stride_inner=1, inner_size=1, n_vocab=1, vocab_start=1)
    compile_logprobs(lk._token_logprobs_fwd_kernel, dict(WITH_ENTROPY=True, BLOCK_V=16, **ones))
    compile_logprobs(lk._policy_loss_from_logits_kernel,
                     dict(fused, stride_outer=1, inner_size=1, n_vocab=1, grad_stride_outer=1, BLOCK_V=16, n_rows=1,
                          rows_per_program=1))
    compile_logprobs(lk._policy_loss_from_logits_kernel,
                     dict(fused, HAS_MASK=False, BLOCK_V=16, n_rows=1, rows_per_program=1))
    count += 3
    # The LM-head chunks with fp32_lm_head: fp32 logits, their gradient written to a bf16 buffer.
    compile_logprobs(lk._token_logprobs_fwd_kernel, dict(WITH_ENTROPY=True, BLOCK_V=4096), logits_ptr="*fp32")
    compile_logprobs(lk._token_logprobs_bwd_kernel, dict(HAS_GRAD_LOGP=True, HAS_GRAD_ENTROPY=True, BLOCK_V=4096),
                     logits_ptr="*fp32", grad_ptr="*bf16")
    compile_logprobs(lk._policy_loss_from_logits_kernel, dict(fused, WITH_ENTROPY=True, BLOCK_V=lk.FUSED_MAX_BLOCK_V),
                     num_warps=lk.FUSED_NUM_WARPS, logits_ptr="*fp32", grad_ptr="*bf16")
    count += 3
    print("compiled", count)
    """
)


CONTRASTIVE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import torch
    from negkernels.triton import contrastive as ck

    INTS = {"n_queries", "n_slots", "dim", "n_extra", "k", "valid_count", "split_slots", "n_splits", "grad_stride",
            "slot_end",
            "stride_qn", "stride_qd", "stride_pn", "stride_pd", "stride_bk", "stride_bd", "stride_en", "stride_em",
            "stride_ed"}
    FP32 = ("loss_ptr", "lse_all_ptr", "lse_pos_ptr", "temperature_ptr", "grad_loss_ptr", "r_ptr", "values_ptr",
            "partial_ptr", "acc_ptr", "r_partial_ptr")

    def compile_contrastive(kernel, constexprs, dtype, num_warps=8, int_type="i32", **special):
        pointers = {name: f"*{dtype}" for name in kernel.arg_names if name.endswith("_ptr")}
        pointers.update({name: "*fp32" for name in FP32})
        pointers.update(query_ids_ptr="*i64", bank_ids_ptr="*i64", indices_ptr="*i64", valid_mask_ptr="*i1",
                        self_slot_ptr="*i64",
                        group_max_ptr="*i32", count_ptr="*i32", candidate_ptr="*i64", **special)
        compile_variant(kernel, constexprs, num_warps, pointers, INTS, int_type)

    def compile_topk(dtype, sweep, block_n, block_k):
        # the three top-k passes (both group layouts of the first); returns how many compiled
        logs = dict(LOG2_K=block_k.bit_length() - 1, BLOCK_K=block_k, CAPACITY=ck.topk_capacity(block_k))
        for parity in (False, True):
            compile_contrastive(ck._bank_topk_threshold_kernel,
                                dict(sweep, **logs, BLOCK_N=block_n, LOG2_N=block_n.bit_length() - 1,
                                     PARITY_GROUPS=parity), dtype, 4)
        compile_contrastive(ck._bank_topk_gather_kernel,
                            dict(sweep, **logs, BLOCK_N=block_n, LOG2_N=block_n.bit_length() - 1), dtype, 4)
        rows = ck.TOPK_FINISH_ROWS
        compile_contrastive(ck._bank_topk_finish_kernel,
                            dict(sweep, **logs, BLOCK_N=rows, LOG2_N=rows.bit_length() - 1), dtype, 4)
        return 4

    count = 0
    # (dtype, false-negative mode, valid mask, normalize, extras, self slots, explicit positive)
    # (the limits script below compiles mode 2 in every dtype)
    variants = [("bf16", 0, False, False, False, False, True), ("bf16", 1, True, True, True, True, True),
                ("bf16", 3, False, True, False, True, False), ("fp16", 2, True, False, True, False, True),
                ("fp32", 3, True, False, True, True, True)]
    for dtype, fn, mask, normalize, extra, self_slot, positive in variants:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        dots = ck._dot_settings(torch_dtype, interpret=False)
        opts = dict(FN_MODE=fn, HAS_VALID_MASK=mask, NORMALIZE=normalize, HAS_SELF_SLOT=self_slot,
                    DOT_FP32=dots["DOT_FP32"], PRECISION=dots["PRECISION"])
        grad_opts = dict(opts, GRAD_DOT_FP32=dots["GRAD_DOT_FP32"], GRAD_PRECISION=dots["GRAD_PRECISION"])
        compile_contrastive(ck._bank_info_nce_fwd_kernel,
                            dict(opts, HAS_EXTRA=extra, HAS_POSITIVE=positive, BLOCK_N=128, BLOCK_K=64, BLOCK_D=128),
                            dtype)
        compile_contrastive(ck._bank_info_nce_bwd_query_kernel,
                            dict(grad_opts, HAS_EXTRA=extra, EXTRA_GRAD=extra, HAS_POSITIVE=positive, BLOCK_N=64,
                                 BLOCK_K=64, BLOCK_D=256), dtype)
        count += 2
        if dtype != "fp32":
            compile_contrastive(ck._bank_info_nce_bwd_bank_kernel, dict(grad_opts, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128),
                                dtype)
            count += 1
        compile_contrastive(ck._bank_info_nce_dq_kernel, dict(NORMALIZE=normalize, BLOCK_N=64, BLOCK_D=256), dtype)
        count += 1
    for reduce, fn in ((False, 0), (True, 0), (False, 3), (True, 3)):
        compile_contrastive(ck._bank_info_nce_combine_kernel,
                            dict(BLOCK=1024 if reduce else 256, FN_MODE=fn, REDUCE=reduce), "fp32", 4)
        count += 1
    # the three top-k passes, plain and with every option
    for dtype, dot_fp32, mask, normalize in (("bf16", False, False, False), ("fp32", True, True, True)):
        count += compile_topk(dtype, dict(HAS_VALID_MASK=mask, NORMALIZE=normalize, DOT_FP32=dot_fp32,
                                          PRECISION="ieee", BLOCK_D=128, D_CHUNKS=1), 64, 64)
    # 64-bit sizes and launches specialised on arguments equal to 1
    opts = dict(FN_MODE=1, HAS_VALID_MASK=False, NORMALIZE=True, HAS_SELF_SLOT=False, DOT_FP32=False,
                PRECISION="ieee")
    grad_opts = dict(opts, GRAD_DOT_FP32=False, GRAD_PRECISION="ieee")
    ones = dict(n_queries=1, n_slots=1, dim=1, stride_qd=1, stride_bd=1)
    compile_contrastive(ck._bank_info_nce_fwd_kernel,
                        dict(opts, HAS_EXTRA=True, HAS_POSITIVE=True, BLOCK_N=16, BLOCK_K=64, BLOCK_D=16, n_extra=1,
                             **ones),
                        "bf16", 4, "i64")
    compile_contrastive(ck._bank_info_nce_bwd_bank_kernel, dict(grad_opts, BLOCK_N=64, BLOCK_K=16, BLOCK_D=16, **ones),
                        "bf16", 4, "i64")
    count += 2
    print("compiled", count)
    """
)


# The tiles the launchers choose (nce_tiles, topk_tiles) at the largest head dimension they promise
# (D = 1024) and the widest top-k list (k = 256), in every dtype: each must fit sm_90's limits.
CONTRASTIVE_LIMITS_SCRIPT = CONTRASTIVE_SCRIPT.split("count = 0")[0] + textwrap.dedent(
    """
    count = 0
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        dots = ck._dot_settings(torch_dtype, interpret=False)
        opts = dict(FN_MODE=2, HAS_VALID_MASK=True, NORMALIZE=True, HAS_SELF_SLOT=True, DOT_FP32=dots["DOT_FP32"],
                    PRECISION=dots["PRECISION"])
        grad_opts = dict(opts, GRAD_DOT_FP32=dots["GRAD_DOT_FP32"], GRAD_PRECISION=dots["GRAD_PRECISION"])
        t = ck.nce_tiles(torch_dtype, 1024)
        bwd = dict(BLOCK_N=t["bwd_tile"], BLOCK_K=t["bwd_tile"], BLOCK_D=t["block_d"])
        compile_contrastive(ck._bank_info_nce_fwd_kernel,
                            dict(opts, HAS_EXTRA=True, HAS_POSITIVE=True, BLOCK_N=t["fwd_rows"], BLOCK_K=t["fwd_slots"],
                                 BLOCK_D=t["block_d"]), dtype, 8 if t["fwd_rows"] * t["block_d"] >= 128 * 128 else 4)
        compile_contrastive(ck._bank_info_nce_bwd_query_kernel,
                            dict(grad_opts, HAS_EXTRA=True, EXTRA_GRAD=True, HAS_POSITIVE=True, **bwd), dtype)
        compile_contrastive(ck._bank_info_nce_bwd_bank_kernel, dict(grad_opts, **bwd), dtype)
        count += 3
        for d, k in ((128, 256), (1024, 256), (1024, 64)):
            t = ck.topk_tiles(torch_dtype, d, k)
            count += compile_topk(dtype, dict(HAS_VALID_MASK=True, NORMALIZE=True, DOT_FP32=dots["DOT_FP32"],
                                              PRECISION="ieee", BLOCK_D=t["block_d"], D_CHUNKS=t["d_chunks"]),
                                  t["rows"], t["block_k"])
    print("compiled", count)
    """
)


KV_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from negkernels.triton import kv

    def compile_kv(kernel, constexprs, num_warps=4, int_type="i32", **pointers):
        ints = {name for name in kernel.arg_names if not name.endswith("_ptr") and not name.isupper()
                and name != "key_norm_weight"}
        base = {name: "*fp32" for name in kernel.arg_names if name.endswith("_ptr")}
        base.update(pointers)
        return compile_variant(kernel, constexprs, num_warps, base, ints, int_type)

    count = 0
    for lb, pos, per_batch, keys in (("bf16", "*i32", False, False), ("fp32", "*i64", True, True),
                                     ("fp16", "*fp32", True, False)):
        compiled = compile_kv(kv._retention_scores_kernel,
                              dict(STEP_PER_BATCH=per_batch, POS_FLOAT=pos == "*fp32", HAS_KEYS=keys, BLOCK_S=256,
                                   BLOCK_D=64), lb_ptr=f"*{lb}", pos_ptr=pos, step_ptr="*i64", keys_ptr="*bf16")
        assert_strides_scaled_in_64_bits(kv._retention_scores_kernel, compiled)
        count += 1
    for from_lb, per_batch, pos, lengths, block, warps, int_type in (
            (False, False, "*i64", False, 4096, 16, "i32"), (True, False, "*i32", True, 4096, 16, "i32"),
            (True, True, "*fp32", False, 16, 4, "i32"), (True, True, "*i64", True, 2048, 16, "i64")):
        compiled = compile_kv(kv._select_retained_kernel,
                              dict(FROM_LOG_BETA=from_lb, STEP_PER_BATCH=per_batch, POS_FLOAT=pos == "*fp32",
                                   HAS_LENGTHS=lengths, BLOCK=block), warps, int_type,
                              lb_ptr="*bf16", pos_ptr=pos, step_ptr="*i64", lengths_ptr="*i32", out_ptr="*i64")
        assert_strides_scaled_in_64_bits(kv._select_retained_kernel, compiled)
        count += 1
    for digit_pass, from_lb, lengths, block, warps, int_type in (
            (0, True, False, 4096, 16, "i32"), (3, True, True, 2048, 16, "i64"), (2, False, True, 16, 4, "i32")):
        for kernel, extra in ((kv._select_histogram_kernel, dict(PASS=digit_pass)), (kv._select_write_kernel, {})):
            compiled = compile_kv(kernel, dict(FROM_LOG_BETA=from_lb, STEP_PER_BATCH=False, POS_FLOAT=False,
                                               HAS_LENGTHS=lengths, BLOCK=block, SPLIT_BLOCK=16, **extra),
                                  warps, int_type, lb_ptr="*bf16", pos_ptr="*i64", step_ptr="*i64",
                                  lengths_ptr="*i32", hist_ptr="*i32", out_ptr="*i64")
            assert_strides_scaled_in_64_bits(kernel, compiled)
            count += 1
    for has_kv, num_meta, in_place, int_type in ((True, 2, False, "i32"), (True, 0, True, "i32"),
                                                 (False, 1, True, "i64"), (True, 2, True, "i64")):
        compiled = compile_kv(kv._compact_kv_kernel,
                              dict(HAS_KV=has_kv, NUM_META=num_meta, IN_PLACE=in_place, BLOCK_M=32, BLOCK_D=128), 4,
                              int_type, idx_ptr="*i64", k_ptr="*bf16", v_ptr="*bf16", ok_ptr="*bf16", ov_ptr="*bf16",
                              m1_ptr="*i64", om1_ptr="*i64")
        assert_strides_scaled_in_64_bits(kv._compact_kv_kernel, compiled)
        count += 1
    for lb in ("fp32", "bf16"):
        compile_kv(kv._retention_mass_fwd_kernel, dict(BLOCK_T=64, BLOCK_I=64), 4, lb_ptr=f"*{lb}", starts_ptr="*i64")
        compile_kv(kv._retention_mass_bwd_kernel, dict(BLOCK_T=64, BLOCK_I=64), 8, lb_ptr=f"*{lb}", ends_ptr="*i64")
        count += 2
    for lengths, block, warps, int_type in ((False, 2048, 8, "i32"), (True, 16, 4, "i64")):
        compiled = compile_kv(kv._select_global_kernel, dict(HAS_LENGTHS=lengths, BLOCK=block), warps, int_type,
                              forced_ptr="*i8", lengths_ptr="*i32", keep_ptr="*i8")
        count += 1
    print("compiled", count)
    """
)


PREFERENCE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from negkernels.reference.preference import PreferenceLossType
    from negkernels.triton import preference as pref

    INTS = {"num_chosen", "num_rejected", "num_programs", "chosen_len", "rejected_len", "c_sb", "c_st", "r_sb",
            "r_st", "cm_sb", "cm_st", "rm_sb", "rm_st", "rc_sb", "rc_st", "rr_sb", "rr_st"}
    count = 0
    for loss in PreferenceLossType:
        reference_free = loss.name in ("SIMPO", "ORPO")
        # sequence sums; bf16 token rows with masks and [B] or per-token references; no gradient
        for masks, per_token, grad, dtype in ((False, False, True, "fp32"), (True, True, True, "bf16"),
                                              (True, False, False, "fp16")):
            pointers = {name: f"*{dtype}" for name in ("chosen_ptr", "rejected_ptr", "ref_chosen_ptr",
                                                       "ref_rejected_ptr")}
            pointers |= {"chosen_mask_ptr": "*u8", "rejected_mask_ptr": "*i64"}
            compile_variant(pref._preference_loss_kernel,
                            dict(LOSS=int(loss), HAS_CHOSEN_MASK=masks, HAS_REJECTED_MASK=masks,
                                 HAS_REF=not reference_free, REF_CHOSEN_PER_TOKEN=per_token,
                                 REF_REJECTED_PER_TOKEN=per_token, NORMALIZE=masks or reference_free,
                                 CALIBRATE=loss.name == "NPO" and per_token, COMPUTE_GRAD=grad,
                                 PAIRED=loss.name not in ("KTO", "NPO") or masks, REDUCE=grad,
                                 BLOCK_B=4 if masks else 64, BLOCK_T=1024 if masks else 1,
                                 FINAL_BLOCK=256 if masks else 1), 4, pointers, INTS, "i64")
            count += 1
    print("compiled", count)
    """
)


def _compile_in_subprocess(script: str) -> str:
    """Run a compile script as one process per core (up to 4), each compiling its share of the
    variants (SHARD in PRELUDE); every shard must succeed. Returns shard 0's output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shards = max(1, min(os.cpu_count() or 1, 4))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "NEGKERNELS_CODEGEN_SHARD": str(i), "NEGKERNELS_CODEGEN_SHARDS": str(shards)},
        )
        for i in range(shards)
    ]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-4000:]
    return outputs[0][0]


def test_every_advantages_kernel_variant_compiles_for_sm90():
    assert "compiled 66" in _compile_in_subprocess(SCRIPT)


def test_every_logprobs_kernel_variant_compiles_for_sm90():
    assert "compiled 57" in _compile_in_subprocess(LOGPROBS_SCRIPT)


def test_every_contrastive_kernel_variant_compiles_for_sm90():
    assert "compiled 33" in _compile_in_subprocess(CONTRASTIVE_SCRIPT)


def test_contrastive_tiles_fit_sm90_at_the_largest_head_dim_and_list():
    assert "compiled 45" in _compile_in_subprocess(CONTRASTIVE_LIMITS_SCRIPT)


def test_every_kv_kernel_variant_compiles_for_sm90():
    assert "compiled 23" in _compile_in_subprocess(KV_SCRIPT)


def test_every_preference_kernel_variant_compiles_for_sm90():
    assert "compiled 45" in _compile_in_subprocess(PREFERENCE_SCRIPT)
