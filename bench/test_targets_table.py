"""The benchmark scripts' bookkeeping, without timing anything: the per-ISA target table, the
--isa environment, the model shapes (runs in the CI smoke run, `pytest bench/ --benchmark-disable`)."""

import numpy as np
import pytest

import _attn_impls as impls
import _targets
import ratios


def test_every_bound_belongs_to_a_known_target():
    for isa, bounds in _targets.TARGETS.items():
        assert isa in ratios.TORCH_CAPABILITY, isa
        unknown = set(bounds) - set(_targets.TARGET_KEYS)
        assert not unknown, f"{isa}: bounds for unknown targets {unknown}"
    assert _targets.TARGETS["avx2"]["dense_torch"] == 1.3 and _targets.TARGETS["avx2"]["models_torch"] == 1.3
    assert _targets.TARGETS["avx2"]["dense_gemm"] == 0.85
    assert "generic" not in _targets.TARGETS


def test_judged_against_the_isa_in_use():
    T = _targets.Targets("avx2")
    T.add("models_torch", "a", 1.2)
    T.add("models_torch", "b", 1.4)
    T.add("overhead", "c", 0.6)                 # "<=" target
    T.add("models_torch", "d", None)
    T.add("window_torch", "e", 5.0, judge=False)
    T.add("forced", "f", False, group=0)
    assert [t["status"] for t in T.items] == ["FAIL", "PASS", "FAIL", "SKIP", "INFO", "FAIL"]
    assert T.items[0]["bound"] == 1.3
    T5 = _targets.Targets("avx512")
    T5.add("models_torch", "a", 1.2)
    assert T5.items[0]["status"] == "PASS" and T5.items[0]["bound"] == 1.15


def test_no_targets_on_generic_means_no_fail(capsys):
    T = _targets.Targets("generic")
    T.add("models_torch", "slow", 0.1)
    T.add("forced", "not forced", False, group=0)
    T.add("memory_mib", "big", 1e4, unit=" MiB")
    counts = T.print()
    out = capsys.readouterr().out
    assert counts["FAIL"] == 0 and counts["INFO"] == 3
    assert "no targets set for ISA generic on this CPU" in out


def test_forced_environment_names_every_library():
    for isa, env in ratios.FORCE_ENV.items():
        assert env["SELFATTN_ISA"] == isa
        assert {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"} <= set(env)
        assert env["ATEN_CPU_CAPABILITY"].upper() == ratios.TORCH_CAPABILITY[isa]   # torch reads it lower-case
    assert ratios.FORCE_ENV["avx2"]["OPENBLAS_CORETYPE"] == "Haswell"


def test_unknown_isa_or_group_is_refused():
    with pytest.raises(SystemExit):
        ratios.main(["--isa", "avx3"])
    with pytest.raises(SystemExit):
        ratios.main(["--group", "everything"])


@pytest.mark.parametrize("case", impls.MODEL_CASES, ids=[c["name"] for c in impls.MODEL_CASES])
def test_model_cases_are_what_they_say(case):
    full = impls.model_case(case)
    q, k, v, sa_kw, torch_kw, flops = impls.model_problem(impls.model_case(case, tiny=True))
    assert q.shape[-2] <= 96 and k.shape[-2] <= 96, "tiny shapes keep the smoke run fast"
    assert full["H"] % full["Hkv"] == 0 and flops > 0
    assert sa_kw.get("enable_gqa", False) == torch_kw.get("enable_gqa", False) == (full["Hkv"] != full["H"])
    assert sa_kw["is_causal"] == torch_kw["is_causal"] == full["causal"]
    if full["key_lengths"] is not None:      # selfattn's key_lengths and torch's bool mask say the same
        kl, mask = sa_kw["key_lengths"], torch_kw["attn_mask"]
        assert mask.dtype == np.bool_ and mask.shape == (q.shape[0], 1, 1, k.shape[-2])
        assert np.array_equal(mask[:, 0, 0].sum(axis=-1), kl)
        assert len(full["key_lengths"]) == full["B"] and max(full["key_lengths"]) <= full["L"]
