"""The kernels' option codes and argument slots: one Python definition, the same C++ enums."""

import re
from pathlib import Path

import pytest

from negkernels.ops.logprobs import PolicyKernelCodes, PolicyKernelScalars, PolicyLossConfig
from negkernels.reference.logprobs import (
    AGGREGATIONS,
    IS_MODES,
    KL_ESTIMATORS,
    LOSS_TYPES,
    Aggregation,
    IsMode,
    KlEstimator,
    LossType,
)

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def cpp_enum(name: str, header: str = "logprobs.h") -> list[tuple[str, int]]:
    """(name, value) of every enumerator of ``enum name`` in csrc/<header>, implicit values counted."""
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", (CSRC / header).read_text())
    assert body, f"enum {name} not found in csrc/{header}"
    out, nxt = [], 0
    for item in (x.strip() for x in body.group(1).split(",")):
        if not item:
            continue
        key, _, value = (p.strip() for p in item.partition("="))
        nxt = int(value) if value else nxt
        out.append((key, nxt))
        nxt += 1
    return out


def snake(cpp_name: str, strip: str = "") -> str:
    """kSeqMeanTokenSumNorm → SEQ_MEAN_TOKEN_SUM_NORM (after dropping a prefix such as kCode)."""
    prefix = "k" + strip if cpp_name.startswith("k" + strip) else "k"
    word = cpp_name[len(prefix) :]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", word).upper()


@pytest.mark.parametrize(
    "py, cpp, aliases",
    [
        (
            LossType,
            "LossType",
            {
                "P_P_O": "PPO",
                "G_S_P_O": "GSPO",
                "C_I_S_P_O": "CISPO",
                "S_A_P_O": "SAPO",
                "G_P_G": "GPG",
                "N_P_O": "NPO",
            },
        ),
        (KlEstimator, "KlEstimator", {"KL_NONE": "NONE"}),
        (Aggregation, "Aggregation", {}),
        (IsMode, "IsMode", {"IS_NONE": "NONE"}),
    ],
)
def test_python_codes_equal_the_cpp_enums(py, cpp, aliases):
    got = {aliases.get(snake(k), snake(k)): v for k, v in cpp_enum(cpp)}
    assert got == {m.name: int(m) for m in py}


def test_every_option_name_has_a_code():
    assert [m.name.lower().replace("_plus", "+") for m in list(KlEstimator)[1:]] == list(KL_ESTIMATORS)
    assert [m.name.lower() for m in LossType] == list(LOSS_TYPES)
    assert [m.name.lower().replace("_", "-") for m in Aggregation] == list(AGGREGATIONS)
    assert [m.name.lower() for m in list(IsMode)[1:]] == list(IS_MODES)


def test_argument_slots_follow_the_python_field_order():
    codes = [snake(k, "Code") for k, _ in cpp_enum("PolicyCodeSlot")]
    assert codes[-1] == "POLICY_CODE_COUNT"
    assert [c.lower() for c in codes[:-1]] == list(PolicyKernelCodes._fields)
    assert [v for _, v in cpp_enum("PolicyCodeSlot")] == list(range(len(codes)))
    scalars = [snake(k, "Scalar") for k, _ in cpp_enum("PolicyScalarSlot")]
    assert scalars[-1] == "POLICY_SCALAR_COUNT"
    assert [s.lower() for s in scalars[:-1]] == list(PolicyKernelScalars._fields)


def test_config_codes_by_name():
    codes, scalars = PolicyLossConfig(
        loss_type="sapo",
        kl_estimator="k3+",
        is_mode="mask",
        aggregation="seq-mean-token-sum-norm",
        clip_low=0.1,
        dual_clip=3.0,
    ).kernel_args(
        use_kl=True,
        use_is=True,
        adv_per_token=False,
        iw_per_token=True,
        compute_grad=False,
        num_sequences=3,
        seq_len=7,
        max_len=7,
        norm_constant=7.0,
    )
    c, s = PolicyKernelCodes(*codes), PolicyKernelScalars(*scalars)
    assert (c.loss, c.kl, c.is_mode, c.aggregation) == (
        LossType.SAPO,
        KlEstimator.K3_PLUS,
        IsMode.MASK,
        Aggregation.SEQ_MEAN_TOKEN_SUM_NORM,
    )
    assert (c.iw_per_token, c.adv_per_token, c.num_sequences) == (1, 0, 3)
    assert s.lo == pytest.approx(0.9) and s.dual_clip == 3.0 and s.delta == float("inf")
    off, _ = PolicyLossConfig(kl_coef=0.5).kernel_args(
        use_kl=False,
        use_is=False,
        adv_per_token=True,
        iw_per_token=True,
        compute_grad=True,
        num_sequences=1,
        seq_len=1,
        max_len=1,
        norm_constant=1.0,
    )
    assert PolicyKernelCodes(*off).kl == KlEstimator.NONE and PolicyKernelCodes(*off).is_mode == IsMode.NONE


def test_advantage_codes_equal_the_cpp_enums():
    from negkernels.reference.advantages import ESTIMATORS, SCALES
    from negkernels.triton.advantages import ESTIMATOR_CODES, SCALE_CODES

    estimators = {snake(k).lower(): v for k, v in cpp_enum("Estimator", "advantages.h")}
    scales = {snake(k, "Scale").lower(): v for k, v in cpp_enum("Scale", "advantages.h")}
    assert estimators == ESTIMATOR_CODES == {name: i for i, name in enumerate(ESTIMATORS)}
    assert scales == SCALE_CODES == {name: i for i, name in enumerate(SCALES)}
