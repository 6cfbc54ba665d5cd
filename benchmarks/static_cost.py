"""Static cost of every bench case on an H100, from the compiled code alone (no GPU needed).

Each case's Triton launches are recorded at the bench shape (the launchers run on "meta"
tensors with every launch stubbed and the grid sized for 132 SMs), then each launched variant is
compiled for sm_90a by Triton's own compiler with the specialisation a real launch gets (16-byte
aligned pointers, integers divisible by 16 marked so). From the cubin: registers, spilled bytes
(STACK / LOCAL), shared memory, blocks per SM, the innermost loops' SASS bodies. From those and
each loop's trip count per program:

    issue-bound lower bound = max(Σ warp-instructions / (132 SMs × 4 schedulers × 1.98 GHz),
                                 waves × one program's warp-instructions / (min(warps, 4) × 1.98 GHz))

(the second term: a grid of fewer programs than SMs, or one program per SM, cannot use the
whole machine), and the SFU bound: Σ MUFU warp-instructions × 32 lanes / (132 SMs × 16 lanes ×
1.98 GHz), which an exponential-heavy kernel meets before the issue bound;
beside the case's memory floor (bytes it must move / 3.35 TB/s) and, for matmul cases, the bf16
tensor-core floor (989 TFLOP/s). Both are lower bounds: a case whose larger bound exceeds its
target cannot reach the target as built; "bound/target" is the larger bound over the target.
Straight-line code outside the innermost loops is counted once per program.

    python benchmarks/static_cost.py [--case SUBSTRING] [--json PATH]

Run it with TRITON_INTERPRET unset (``tests/test_static_cost.py`` does, in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# H100 SXM: the targets in negkernels/cases/ are H100 figures.
SMS = 132
SCHEDULERS_PER_SM = 4
SFU_LANES_PER_SM = 16  # MUFU results per clock and SM (the CUDA guide's throughput table, cc 9.0)
CLOCK_HZ = 1.98e9  # the highest boost clock: the bound stays a lower bound
HBM_BYTES_PER_S = 3.35e12
BF16_FLOPS_PER_S = 989e12
REGISTER_FILE = 65536
SHARED_PER_SM = 233472  # 228 KiB; 227 KiB per block
SHARED_PER_BLOCK = 232448
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = 64
TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: dict  # every parameter by name, positional ones included
    options: dict  # num_warps, num_stages


@contextlib.contextmanager
def recorded_launches():
    """Launchers run on meta tensors: each launch is recorded instead of run, grids sized for SMS."""
    import triton.runtime.jit as jit

    from negkernels import _backend

    launches: list[Launch] = []
    original_getitem, original_sms = jit.JITFunction.__getitem__, _backend.sm_count

    def getitem(kernel, grid):
        def record(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_cooperative_grid") if k in kwargs}
            bound = dict(zip(kernel.arg_names, args))
            bound.update(kwargs)
            launches.append(Launch(kernel, tuple(grid) if not callable(grid) else grid(bound), bound, options))

        return record

    jit.JITFunction.__getitem__ = getitem
    _backend.sm_count = lambda device: SMS
    try:
        yield launches
    finally:
        jit.JITFunction.__getitem__ = original_getitem
        _backend.sm_count = original_sms


def compile_launch(launch: Launch):
    """The variant a real launch would compile: constexprs as given, integers equal to 1 made
    constants, 16-byte alignment and divisibility by 16 marked as Triton's runtime does."""
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        value = launch.args.get(name, param.default)
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(launch.options))


def _cuobjdump(compiled, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def sass_profile(compiled) -> dict:
    """Instruction count; the innermost loops' (start, end, body instructions) in address order;
    the loops that hold other loops, with the instructions of their own (outside every loop
    inside them), in address order."""
    lines = [ln for ln in _cuobjdump(compiled, "-sass").splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    address = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    ends: dict[int, int] = {}  # loop head → its last backward branch
    for ln, a in zip(lines, address):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a:
            ends[int(m.group(1), 16)] = max(a, ends.get(int(m.group(1), 16), 0))
    loops = sorted(ends.items())
    within = lambda c, d, a, b: (a, b) != (c, d) and a <= c and d <= b  # noqa: E731
    inner = [(a, b) for a, b in loops if not any(within(c, d, a, b) for c, d in loops)]
    outer = [(a, b) for a, b in loops if (a, b) not in inner]
    bodies = [(a, b, sum(1 for x in address if a <= x <= b)) for a, b in inner]
    own = [
        (a, b, sum(1 for x in address if a <= x <= b and not any(within(c, d, a, b) and c <= x <= d for c, d in loops)))
        for a, b in outer
    ]
    shuffles = [sum(1 for ln, x in zip(lines, address) if a <= x <= b and "SHFL" in ln) for a, b, _ in bodies]
    barriers = [sum(1 for ln, x in zip(lines, address) if a <= x <= b and " BAR" in ln) for a, b, _ in bodies]
    local = [
        sum(1 for ln, x in zip(lines, address) if a <= x <= b and re.search(r"\b(STL|LDL)\b", ln)) for a, b, _ in bodies
    ]  # spill traffic inside the hot loops
    # MUFU (exponentials, logarithms, reciprocals): 16 lanes an SM, a quarter of the issue rate
    mufu = [x for ln, x in zip(lines, address) if "MUFU" in ln]
    loop_mufu = [sum(1 for x in mufu if a <= x <= b) for a, b, _ in bodies]
    outer_mufu = [
        sum(1 for x in mufu if a <= x <= b and not any(within(c, d, a, b) and c <= x <= d for c, d in loops))
        for a, b, _ in own
    ]
    return dict(
        instructions=len(lines),
        loops=bodies,
        outer_loops=own,
        loop_shuffles=shuffles,
        loop_barriers=barriers,
        loop_local=local,
        mufu=len(mufu),
        loop_mufu=loop_mufu,
        outer_mufu=outer_mufu,
    )


def resources(compiled, num_warps: int) -> dict:
    usage = _cuobjdump(compiled, "-res-usage")
    field = lambda key: int(re.search(key + r":(\d+)", usage).group(1))  # noqa: E731
    regs, stack, local = field("REG"), field("STACK"), field("LOCAL")
    shared = compiled.metadata.shared
    threads = 32 * num_warps
    by_regs = REGISTER_FILE // max(regs * threads, 1)
    by_shared = SHARED_PER_SM // shared if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_regs, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return dict(regs=regs, spill_bytes=stack + local, shared=shared, threads=threads, blocks_per_sm=blocks)


@dataclass
class StaticCase:
    case_id: str
    target_ms: float
    run: Callable[[dict], None]  # calls the launchers on the meta inputs
    # kernel name → its innermost loops' trip counts per program (every trip of the program, not
    # per trip of an enclosing loop), in address order, from the recorded launch; a kernel not
    # named here runs its loops once
    trips: dict[str, Callable[[Launch], list]]
    # likewise for the loops that hold other loops: their own instructions × these counts
    outer_trips: dict[str, Callable[[Launch], list]] = field(default_factory=dict)


def _cdiv(a, b):
    return -(-a // b)


def expected_candidates(groups: int, k: int) -> float:
    """Slots at or above the top-k bound τ (the k-th largest of ``groups`` group maxima) per row,
    for independent, identically distributed similarities: the first m slots in descending order
    fall into groups·(1 − e^(−m/groups)) distinct groups, which reaches k at
    m = groups·ln(groups / (groups − k)). tests/test_static_cost.py checks it on random data."""
    return groups * math.log(groups / (groups - k)) if groups > k else float("inf")


def expected_rounds(per_tile: float, rows: int, limit: int) -> float:
    """E[max over ``rows`` rows of a Poisson(per_tile) count, at most ``limit`` (the tile's
    width)]: the gather's rounds in one tile, one per candidate of its busiest row."""
    total, below = 0.0, 0.0
    for j in range(limit):
        below += math.exp(-per_tile) * per_tile**j / math.factorial(j)  # P(count ≤ j)
        total += 1.0 - min(below, 1.0) ** rows  # P(max > j)
    return total


def _cases() -> list[StaticCase]:
    from negkernels.ops.logprobs import PolicyKernelCodes, PolicyKernelScalars, PolicyLossConfig, _row_view
    from negkernels.reference.preference import PreferenceLossType
    from negkernels.triton import advantages as ta
    from negkernels.triton import contrastive as tc
    from negkernels.triton import kv as tk
    from negkernels.triton import logprobs as tl_
    from negkernels.triton import preference as tp

    def codes_for(i, rows, compute_grad=True, **extra):
        codes, scalars = PolicyLossConfig().kernel_args(
            use_kl=False,
            use_is=False,
            adv_per_token=extra.get("adv_per_token", True),
            iw_per_token=True,
            compute_grad=compute_grad,
            num_sequences=i.get("b", 1),
            seq_len=i.get("t", rows),
            max_len=i.get("t", rows),
            norm_constant=1.0,
        )
        return PolicyKernelCodes(*codes), PolicyKernelScalars(*scalars)

    def advantages(i):
        ta.group_advantages_fwd(
            i["rewards"],
            i.get("group_index"),
            i.get("group_size") or 0,
            i["num_groups"],
            "grpo",
            "group",
            1e-6,
            1.0,
            1,
            1.0,
            1.0,
            None,
            None,
            None,
        )

    def disco(i):
        ta.group_discriminative_fwd(i["scores"], i["correct"], i["group_index"], None, i["num_groups"], 0.5, True)

    def logprobs(with_entropy):
        def run(i):
            x, so, si, inner = _row_view(i["logits"])
            tl_.token_logprobs_fwd(
                x, so, si, inner, i["b"] * i["t"], i["v"], i["targets"].reshape(-1), 1.0, 0, with_entropy
            )

        return run

    def from_logits(i):
        x, so, si, inner = _row_view(i["logits"])
        rows = i["b"] * i["t"]
        codes, scalars = codes_for(i, rows, adv_per_token=False)  # as policy_loss_from_logits calls it
        tl_.policy_loss_from_logits_fwd(
            x,
            so,
            si,
            inner,
            torch.empty_like(x),
            so,
            si,
            rows,
            i["v"],
            i["targets"].reshape(-1),
            i["old_logp"],
            i["advantages"],
            None,
            None,
            None,
            codes,
            scalars,
            False,
            mask=i["mask"].view(torch.uint8),
            normaliser=None,
        )  # token-mean of this call: the kernel counts the mask

    def policy(i):
        codes, scalars = codes_for(i, i["b"] * i["t"], adv_per_token=False)
        tl_.policy_loss_fwd(
            i["logp"],
            i["old_logp"],
            i["advantages"],
            i["mask"].view(torch.uint8),
            None,
            None,
            None,
            None,
            codes,
            scalars,
        )

    def nce(i):
        q, p, bank = i["query"].detach(), i["positive"].detach(), i["bank"]
        tau = torch.empty((), device="meta")
        # as bank_info_nce calls it: the mean over queries, reduced by the combine kernel
        _, lse_all, lse_pos = tc.bank_info_nce_fwd(
            q, p, bank, tau, None, None, None, None, bank.shape[0], None, False, False, reduce_scale=1.0 / q.shape[0]
        )
        tc.bank_info_nce_bwd(
            torch.empty((), device="meta"),
            q,
            p,
            bank,
            tau,
            None,
            None,
            None,
            None,
            bank.shape[0],
            None,
            False,
            lse_all,
            lse_pos,
            False,
            False,
            False,
        )

    def topk(i):
        tc.bank_topk(i["query"].detach(), i["bank"], 64, None, i["bank"].shape[0], False, False)

    def evict(i):
        indices = tk.select_from_log_beta_fwd(i["log_beta"], i["positions"], i["step"], i["budget"], 0, 0, None)
        b, h, m = indices.shape
        keys, values = i["keys"], i["values"]
        outs = [
            keys.new_empty((b, h, m, keys.shape[-1])),
            values.new_empty((b, h, m, values.shape[-1])),
            i["log_beta"].new_empty((b, h, m)),
            i["positions"].new_empty((b, h, m)),
        ]
        tk.compact_kv_fwd(keys, values, indices, [i["log_beta"], i["positions"]], outs, in_place=False)

    def mass(i):
        lb = i["log_beta"].detach()
        tk.retention_mass_fwd(lb, None)
        tk.retention_mass_bwd(lb, None, torch.empty_like(lb))

    def preference(i):  # DPO (sigmoid) on token log-probs with reference tokens and masks, as the bench calls it
        tp.preference_loss_fwd(
            i["chosen"].detach(),
            i["rejected"].detach(),
            i["ref_chosen"],
            i["ref_rejected"],
            i["chosen_mask"],
            i["rejected_mask"],
            None,
            int(PreferenceLossType.SIGMOID),
            "mean",
            False,
            False,
            True,
            0.1,
            0.0,
            0.0,
            0.05,
            1.0,
            1.0,
        )

    def preference_trips(launch):
        # The two value sweeps over each row block's tokens; the last program's sum over every
        # program's partials (per program on average); the two gradient sweeps.
        a = launch.args
        sweeps = [_cdiv(a["chosen_len"], a["BLOCK_T"]), _cdiv(a["rejected_len"], a["BLOCK_T"])]
        return sweeps + [_cdiv(a["num_programs"], a["FINAL_BLOCK"]) / a["num_programs"]] + sweeps

    def vocab_trips(launch):  # one row per program, the full blocks of its vocabulary
        return [launch.args["n_vocab"] // launch.args["BLOCK_V"]]

    def fused_trips(launch):
        a = launch.args
        rows = a["rows_per_program"] * (a["n_vocab"] // a["BLOCK_V"])
        # A call's own token count first: every program counts the mask in COUNT_BLOCK steps.
        counts = a["NORMALISER"] == tl_.NormaliserSource.UNMASKED_ROWS and a["HAS_MASK"] and not a["HAS_WEIGHT"]
        counting = [-(-a["n_rows"] // a["COUNT_BLOCK"])] if counts else []
        return counting + [rows, rows]  # the online sweep and the gradient sweep; the finalize loops once

    def segmented_trips(launch):
        n, programs = launch.args["n_rewards"], launch.grid[0]
        return [_cdiv(n, programs * launch.args["BLOCK"])] * 8

    def disco_trips(launch):  # the four element sweeps and the group sweep, per program
        a, programs = launch.args, launch.grid[0]
        elements, groups = _cdiv(a["n"], programs * a["BLOCK"]), _cdiv(a["num_groups"], programs * a["BLOCK"])
        return [_cdiv(5 * a["num_groups"] + 2, programs * a["BLOCK"]), groups, elements, elements, groups, elements]

    def slot_trips(launch):  # bank slots of one split, in slot tiles
        return [_cdiv(launch.args["split_slots"], launch.args["BLOCK_K"])] * 4

    def query_grad_trips(launch):  # [tiles filled throughout (no slot mask), the rest], per program on average
        a = launch.args
        tiles = _cdiv(a["split_slots"], a["BLOCK_K"])
        if a["FN_MODE"] != 0 or a["HAS_VALID_MASK"]:
            return [tiles]
        splits, filled = launch.grid[1], min(a["valid_count"], a["n_slots"])
        full = (
            sum(max(min(a["split_slots"], filled - s * a["split_slots"]), 0) // a["BLOCK_K"] for s in range(splits))
            / splits
        )
        return [full, tiles - full]

    def select_trips(launch):
        return [_cdiv(launch.args["seq"], launch.args["BLOCK"])] * 16

    def split_select_trips(launch):  # per pass before this one: the row's split histograms; then its chunk
        a = launch.args
        return [_cdiv(a["splits"], a["SPLIT_BLOCK"])] * a["PASS"] + [a["chunk"] // a["BLOCK"]]

    def split_write_trips(launch):
        # per pass, the row's split histograms; then the chunk, and the unused slots, which only
        # the last split fills
        a = launch.args
        return [_cdiv(a["splits"], a["SPLIT_BLOCK"])] * 4 + [
            a["chunk"] // a["BLOCK"],
            _cdiv(a["kept"], a["BLOCK"]) / a["splits"],
        ]

    def mass_fwd_trips(launch):  # [column blocks with a sequence start: none here, unmasked ones]
        blocks = _cdiv(launch.args["seq"], launch.args["BLOCK_T"])
        return [0, (blocks - 1) / 2]  # program p sweeps the p blocks left of its diagonal

    def mass_bwd_trips(launch):
        # Program p sums the blocks - 1 - p step blocks right of its diagonal in chunks of
        # _MASS_CHUNK by Horner's rule; Triton unrolls that loop by 4 (the SASS body holds four
        # blocks' FFMAs), leaving a remainder loop. No block holds a sequence end here.
        blocks, chunk, unroll = _cdiv(launch.args["seq"], launch.args["BLOCK_I"]), tk._MASS_CHUNK.value, 4
        spans = [[min(chunk, n - c) for c in range(0, n, chunk)] for n in (blocks - 1 - p for p in range(blocks))]
        return [
            sum(b // unroll for s in spans for b in s) / blocks,
            sum(b % unroll for s in spans for b in s) / blocks,
            0,
        ]

    def mass_chunks(launch):
        blocks, chunk = _cdiv(launch.args["seq"], launch.args["BLOCK_I"]), tk._MASS_CHUNK.value
        return [sum(_cdiv(blocks - 1 - p, chunk) for p in range(blocks)) / blocks]

    def policy_trips(launch):
        return [_cdiv(launch.args["max_len"], launch.args["BLOCK"])]

    def combine_trips(launch):  # the one reducing program: each row block merges every split
        return [launch.args["n_splits"] * _cdiv(launch.args["n_queries"], launch.args["BLOCK"])] * 2

    def topk_tiles(launch):  # [tiles scanned without a slot mask, masked tiles], per program on average
        a = launch.args
        tiles = a["split_slots"] // a["BLOCK_K"]
        splits = _cdiv(_cdiv(a["n_slots"], a["BLOCK_K"]), tiles)
        filled = min(a["n_slots"], a["valid_count"]) if a["HAS_VALID_MASK"] is False else 0
        full = sum(min(max(filled - s * a["split_slots"], 0) // a["BLOCK_K"], tiles) for s in range(splits)) / splits
        return [full, tiles - full]

    topk_model = {}  # the groups τ is taken from, as the first pass's launch sets them, for the later passes

    def threshold_trips(launch):
        a = launch.args
        groups_per_split = a["BLOCK_K"] * (2 if a["PARITY_GROUPS"] else 1)
        topk_model["groups"] = groups_per_split * launch.grid[1]  # grid: (row blocks, splits)
        return topk_tiles(launch)

    def gather_trips(launch):  # the split merge; one round per candidate the tile's busiest row takes
        a = launch.args
        rate = expected_candidates(topk_model["groups"], a["k"]) / a["n_slots"]
        rounds = expected_rounds(rate * a["BLOCK_K"], a["BLOCK_N"], a["BLOCK_K"])
        return [a["n_splits"] - 1] + [t * rounds for t in topk_tiles(launch)]

    def finish_trips(launch):  # the candidate lists in BLOCK_K chunks; the exact path not taken
        a = launch.args
        return [math.ceil(expected_candidates(topk_model["groups"], a["k"]) / a["BLOCK_K"]), 0]

    nce_trips = {
        "_bank_info_nce_fwd_kernel": slot_trips,
        "_bank_info_nce_bwd_query_kernel": query_grad_trips,
        "_bank_info_nce_combine_kernel": combine_trips,
    }
    evict_trips = {
        "_select_retained_kernel": select_trips,
        "_select_histogram_kernel": split_select_trips,
        "_select_write_kernel": split_write_trips,
    }
    return [
        StaticCase("advantages/uniform-g64", 0.010, advantages, {}),
        StaticCase("advantages/ragged", 0.010, advantages, {"_group_advantages_segmented_kernel": segmented_trips}),
        StaticCase("advantages/disco", float("nan"), disco, {"_group_discriminative_kernel": disco_trips}),
        StaticCase("logprobs/fwd", 0.90, logprobs(False), {"_token_logprobs_fwd_kernel": vocab_trips}),
        StaticCase("logprobs/fwd-entropy", 0.95, logprobs(True), {"_token_logprobs_fwd_kernel": vocab_trips}),
        StaticCase("grpo-from-logits/fwd+bwd", 1.8, from_logits, {"_policy_loss_from_logits_kernel": fused_trips}),
        StaticCase("policy-loss/fwd+bwd", 0.08, policy, {"_policy_loss_fwd_kernel": policy_trips}),
        StaticCase("contrastive/nce", 0.5, nce, nce_trips),
        StaticCase("contrastive/nce-large", 7.0, nce, nce_trips),
        StaticCase(
            "contrastive/topk64",
            0.3,
            topk,
            {
                "_bank_topk_threshold_kernel": threshold_trips,
                "_bank_topk_gather_kernel": gather_trips,
                "_bank_topk_finish_kernel": finish_trips,
            },
            outer_trips={"_bank_topk_gather_kernel": topk_tiles},
        ),
        StaticCase("kv/evict", 0.13, evict, evict_trips),
        StaticCase("kv/evict-8rows", 0.03, evict, evict_trips),
        StaticCase("preference/dpo-tokens", 0.015, preference, {"_preference_loss_kernel": preference_trips}),
        StaticCase(
            "kv/retention-mass",
            1.2,
            mass,
            {"_retention_mass_fwd_kernel": mass_fwd_trips, "_retention_mass_bwd_kernel": mass_bwd_trips},
            outer_trips={"_retention_mass_bwd_kernel": mass_chunks},
        ),
    ]


def analyse(case_filter: str | None = None) -> list[dict]:
    from negkernels.cases import CASES

    by_id = {c.id: c for c in CASES}
    static_cases = _cases()
    rows, compiled_cache = [], {}
    for sc in static_cases:
        if case_filter and case_filter not in sc.case_id:
            continue
        case = by_id[sc.case_id]
        inputs = case.build(torch.device("meta"), True)
        with recorded_launches() as launches:
            sc.run(inputs)
        floor_ms = case.min_bytes(inputs) / HBM_BYTES_PER_S * 1e3
        flops = case.flops(inputs)
        matmul_ms = flops / BF16_FLOPS_PER_S * 1e3 if flops else 0.0
        kernels, warp_instructions, critical_s, sfu_s = [], 0.0, 0.0, 0.0
        for launch in launches:
            key = (
                launch.kernel.__name__,
                repr(sorted((k, v) for k, v in launch.args.items() if not isinstance(v, torch.Tensor))),
                repr(launch.options),
            )
            if key not in compiled_cache:
                compiled = compile_launch(launch)
                compiled_cache[key] = (resources(compiled, launch.options.get("num_warps", 4)), sass_profile(compiled))
            res, sass = compiled_cache[key]
            programs = math.prod(launch.grid)
            warps = res["threads"] // 32
            trips = sc.trips.get(launch.kernel.__name__, lambda launch: [])(launch)
            loops = sass["loops"]
            trip = lambda j, trips=trips: trips[j] if j < len(trips) and trips[j] is not None else 1  # noqa: E731
            looped = sum(body * trip(j) for j, (_, _, body) in enumerate(loops))
            outer = sass["outer_loops"]
            outer_trips = sc.outer_trips.get(launch.kernel.__name__, lambda launch: [])(launch)
            outer_trip = lambda j, outer_trips=outer_trips: outer_trips[j] if j < len(outer_trips) else 1  # noqa: E731
            looped += sum(body * outer_trip(j) for j, (_, _, body) in enumerate(outer))
            straight = sass["instructions"] - sum(body for _, _, body in loops) - sum(body for _, _, body in outer)
            per_program = straight + looped
            mufu = (
                sass["mufu"]
                - sum(sass["loop_mufu"])
                - sum(sass["outer_mufu"])
                + sum(m * trip(j) for j, m in enumerate(sass["loop_mufu"]))
                + sum(m * outer_trip(j) for j, m in enumerate(sass["outer_mufu"]))
            )
            sfu_s += mufu * warps * programs * 32 / (SMS * SFU_LANES_PER_SM * CLOCK_HZ)
            warp_instructions += per_program * warps * programs
            waves = math.ceil(programs / max(res["blocks_per_sm"] * SMS, 1))
            critical_s += waves * per_program * warps / min(warps, SCHEDULERS_PER_SM) / CLOCK_HZ
            kernels.append(
                dict(
                    kernel=launch.kernel.__name__,
                    grid=list(launch.grid),
                    options=launch.options,
                    **res,
                    loop_bodies=[body for _, _, body in loops],
                    loop_trips=trips,
                    outer_bodies=[body for _, _, body in outer],
                    outer_trips=outer_trips,
                    loop_shuffles=sass["loop_shuffles"],
                    loop_barriers=sass["loop_barriers"],
                    loop_local=sass["loop_local"],
                    loop_mufu=sass["loop_mufu"],
                    warp_instructions=per_program * warps * programs,
                    waves=programs / max(res["blocks_per_sm"] * SMS, 1),
                )
            )
        issue_ms = max(warp_instructions / (SMS * SCHEDULERS_PER_SM * CLOCK_HZ), critical_s) * 1e3
        sfu_ms = sfu_s * 1e3
        bound = max(issue_ms, sfu_ms, floor_ms, matmul_ms)
        rows.append(
            dict(
                case=sc.case_id,
                target_ms=sc.target_ms,
                issue_bound_ms=issue_ms,
                sfu_bound_ms=sfu_ms,
                memory_floor_ms=floor_ms,
                matmul_floor_ms=matmul_ms,
                bound_ms=bound,
                bound_over_target=bound / sc.target_ms if sc.target_ms == sc.target_ms else None,
                issue_over_target=issue_ms / sc.target_ms if sc.target_ms == sc.target_ms else None,
                code_over_target=max(issue_ms, sfu_ms) / sc.target_ms if sc.target_ms == sc.target_ms else None,
                kernels=kernels,
            )
        )
    return rows


def print_report(rows: list[dict]) -> None:
    print(
        f"static cost on an H100 (sm_90a code from Triton {triton.__version__}; {SMS} SMs x {SCHEDULERS_PER_SM} "
        f"schedulers at {CLOCK_HZ / 1e9:.2f} GHz, HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s)"
    )
    header = (
        f"{'case':<26} {'target':>8} {'issue':>8} {'sfu':>8} {'memory':>8} {'matmul':>8} {'issue/target':>12} "
        f"{'bound/target':>12}   "
        "kernel: regs, spill B, smem B, blocks/SM, grid, hot-loop SASS x trips"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "-" if r["bound_over_target"] is None else f"{100 * r['bound_over_target']:.0f}%"
        issue = "-" if r["issue_over_target"] is None else f"{100 * r['issue_over_target']:.0f}%"
        target = "-" if r["target_ms"] != r["target_ms"] else f"{r['target_ms']:.3f}"
        print(
            f"{r['case']:<26} {target:>8} {r['issue_bound_ms']:8.3f} {r['sfu_bound_ms']:8.3f} "
            f"{r['memory_floor_ms']:8.3f} "
            f"{r['matmul_floor_ms']:8.3f} {issue:>12} {ratio:>12}"
        )
        for k in r["kernels"]:
            loops = " ".join(
                f"{b}x{t:.4g}" for b, t in zip(k["loop_bodies"], k["loop_trips"] + [1] * len(k["loop_bodies"]))
            )
            if k["outer_bodies"]:
                loops += "; outer " + " ".join(
                    f"{b}x{t:.4g}" for b, t in zip(k["outer_bodies"], k["outer_trips"] + [1] * len(k["outer_bodies"]))
                )
            print(
                f"{'':<26}   {k['kernel']}: {k['regs']}, {k['spill_bytes']}, {k['shared']}, {k['blocks_per_sm']}, "
                f"{k['grid']}, [{loops}]"
            )
    print(
        "times in ms; issue: the issue-bound lower bound of the code as built; sfu: its MUFU instructions "
        "(exponentials, logarithms, reciprocals) / 16 lanes an SM; memory: bytes the case must move / "
        "HBM bandwidth; matmul: flops / bf16 tensor-core rate; bound/target: the largest of the four over the "
        "target (above 100% the target is out of reach as built; a memory floor above 70% of the target means the "
        "target leaves little room for anything but streaming)."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="only cases whose id contains this")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("static_cost.py compiles real kernels: run it with TRITON_INTERPRET unset")
    rows = analyse(args.case)
    print_report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
