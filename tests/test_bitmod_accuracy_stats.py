"""The interval arithmetic of the accuracy study on synthetic per-window tables with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from effllm_lib.bitmod import accuracy as A


def table(configs: dict, n=200, seed=0, kl_every=2):
    """configs: name -> (dtype, bits, per-token NLL shift, per-token KL). Each window's difficulty (base NLL) is
    shared by all configs, as on a real text; each config adds its own small per-window noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(100, 200, n)
    base = rng.normal(3.0, 0.5, n) * tokens
    rows = []
    for name, (dtype, bits, shift, kl) in configs.items():
        noise = rng.normal(0, 0.02, n) * tokens
        for w in range(n):
            has_kl = w % kl_every == 0
            rows.append({"model": "m", "corpus": "c", "config": name, "dtype": dtype, "bits": bits, "clip": False,
                         "calibration": "none", "group_size": 128, "bits_per_weight": 4.0, "weight_mse": 0.0,
                         "quant_seconds": 0.0, "window": w, "tokens": int(tokens[w]),
                         "nll_sum": base[w] + shift * tokens[w] + (noise[w] if name != "float" else 0),
                         "kl_sum": (kl * tokens[w] + (noise[w] if name != "float" else 0)) if has_kl else float("nan"),
                         "top1_same": float(tokens[w]) if has_kl else float("nan")})
    return pd.DataFrame(rows)


CONFIGS = {"float": ("float", 16, 0.0, 0.0), "bitmod3": ("bitmod", 3, 0.10, 0.05), "ant3": ("ant", 3, 0.15, 0.08),
           "olive3": ("olive", 3, 0.151, 0.0805)}


def test_summary_point_estimates_are_ratios_of_sums():
    df = table(CONFIGS)
    s = A.summarize(df, n_boot=300).set_index("config")
    for name in CONFIGS:
        g = df[df.config == name]
        assert s.ppl[name] == pytest.approx(math.exp(g.nll_sum.sum() / g.tokens.sum()))
        k = g.dropna(subset=["kl_sum"])
        assert s.kl[name] == pytest.approx(k.kl_sum.sum() / k.tokens.sum())
        assert s.ppl_lo[name] <= s.ppl[name] <= s.ppl_hi[name]
    assert s.kl["float"] == 0 and s.kl_windows["float"] == 100 and s.windows["float"] == 200


def test_bootstrap_interval_matches_the_normal_approximation():
    # an independent reference: the delta-method standard error of a ratio of sums over i.i.d. windows
    df = table(CONFIGS, n=400)
    s = A.summarize(df, n_boot=4000).set_index("config")
    g = df[df.config == "bitmod3"]
    y, x = g.nll_sum.to_numpy(), g.tokens.to_numpy(float)
    r = y.sum() / x.sum()
    se = math.sqrt(((y - r * x) ** 2).sum()) / x.sum()
    lo, hi = math.exp(r - 1.96 * se), math.exp(r + 1.96 * se)
    assert s.ppl_lo["bitmod3"] == pytest.approx(lo, rel=0.01)
    assert s.ppl_hi["bitmod3"] == pytest.approx(hi, rel=0.01)


def test_paired_comparison_removes_the_shared_noise():
    df = table(CONFIGS)
    o = A.orderings(df, n_boot=1000).set_index("comparison")
    ant = o.loc["ant vs bitmod"]
    # per-token NLL differs by 0.05 (+- small noise) in every window: the paired interval is tight around
    # exp(0.05), although each perplexity alone varies far more from window to window
    a, b = df[df.config == "ant3"], df[df.config == "bitmod3"]
    assert ant.ppl_ratio == pytest.approx(math.exp((a.nll_sum.sum() - b.nll_sum.sum()) / a.tokens.sum()))
    assert ant.ppl_ratio == pytest.approx(math.exp(0.05), rel=5e-3)
    s = A.summarize(df, n_boot=1000).set_index("config")
    assert (ant.ppl_ratio_hi - ant.ppl_ratio_lo) < (s.ppl_hi["ant3"] - s.ppl_lo["ant3"]) / s.ppl["ant3"] / 5
    assert ant.ppl_ratio_lo > 1 and ant.ppl_verdict == ">" and ant.kl_verdict == ">"
    ka, kb = a.dropna(subset=["kl_sum"]), b.dropna(subset=["kl_sum"])
    assert ant.kl_diff == pytest.approx((ka.kl_sum.sum() - kb.kl_sum.sum()) / ka.tokens.sum())
    assert ant.kl_diff == pytest.approx(0.03, abs=0.008)
    # OliVe vs ANT differ by 0.001 nats/token, below the noise: undecided
    olive = o.loc["olive vs ant"]
    assert olive.ppl_verdict == "~" and olive.ppl_ratio_lo < 1 < olive.ppl_ratio_hi
    vs_float = o.loc["bitmod vs float"]
    assert vs_float.ppl_ratio > 1 and vs_float.ppl_verdict == ">"


def test_mismatched_windows_are_refused():
    df = table(CONFIGS)
    df = df[~((df.config == "ant3") & (df.window == 3))]
    with pytest.raises(ValueError, match="windows"):
        A.summarize(df, n_boot=10)


def test_merge_keeps_the_float_model_once():
    df = table(CONFIGS, n=10)
    merged = A._merge_windows([df[df.config.isin(["float", "bitmod3"])], df[df.config.isin(["float", "ant3"])]])
    assert len(merged) == 30 and (merged.config == "float").sum() == 10


def test_sweep_configs_and_spread():
    cfgs = A.sweep_configs(("bitmod", "nf4"), bits=(3, 4), clips=(False, True), calibrations=("none", "awq"))
    assert len(cfgs) == 2 * 2 * 3  # NF4 only at 4 bits
    assert {c.label for c in cfgs} >= {"bitmod3", "bitmod3+clip", "nf44+clip+awq"}
    assert A.spread(10, 3) == [0, 4, 9] and A.spread(5, None) == [0, 1, 2, 3, 4] and A.spread(3, 8) == [0, 1, 2]


def test_sweep_configs_calibrated_only_for_the_named_methods_and_clips():
    cfgs = A.sweep_configs(("bitmod", "ant"), bits=(3,), clips=(False, True), calibrations=("none", "act"),
                           calib_methods=("bitmod",), calib_clips=(True,))
    assert [c.label for c in cfgs] == ["bitmod3", "ant3", "bitmod3+clip", "ant3+clip", "bitmod3+clip+act"]


def test_kl_sweep_copies_olive_clip_rows_and_caches_the_reference():
    from effllm_lib.models import tiny_causal_lm

    model, tok = tiny_causal_lm("llama", seed=0, tokenizer="byte")
    text = "the quick brown fox jumps over the lazy dog. " * 40
    cfgs = A.sweep_configs(("olive", "int_asym"), bits=(3,), clips=(False, True))
    kw = dict(seq_len=32, max_windows=4, kl_windows=3)
    cached = A.kl_sweep(model, tok, {"t": text}, cfgs, cache_reference=True, **kw)
    direct = A.kl_sweep(model, tok, {"t": text}, cfgs, cache_reference=False, **kw)
    o, oc = (cached[cached.config == c].reset_index(drop=True) for c in ("olive3", "olive3+clip"))
    assert o.nll_sum.tolist() == oc.nll_sum.tolist() and oc["clip"].all() and not o["clip"].any()
    assert cached.nll_sum.tolist() == direct.nll_sum.tolist()
    assert np.allclose(cached.kl_sum.fillna(-1), direct.kl_sum.fillna(-1), rtol=1e-6)


def test_claim_rows_from_orderings_take_the_round_to_nearest_setting_with_its_interval():
    rows = []
    for clip in (False, True):
        for comp, ratio in (("ant vs bitmod", 1.3), ("olive vs ant", 1.1), ("bitmod vs float", 1.05)):
            r = ratio + (0.5 if clip else 0)  # the clipped rows must not be picked
            rows.append({"model": "smollm2-135m", "corpus": "wikipedia", "bits": 3, "clip": clip,
                         "calibration": "none", "comparison": comp, "ppl_ratio": r, "ppl_ratio_lo": r - 0.1,
                         "ppl_ratio_hi": r + 0.1, "kl_diff": 0.2, "kl_diff_lo": 0.1, "kl_diff_hi": 0.3})
    o = pd.DataFrame(rows)
    o.attrs["provenance"] = {"params": {"windows": 12, "seq_len": 512, "tokens": 6132}}
    c = A.claim_rows(orderings_df=o, model="smollm2-135m").set_index("claim_id")
    assert c.ours["acc_ratio_ant_over_bitmod_w3"] == 1.3 and c.ours_lo["acc_ratio_ant_over_bitmod_w3"] == 1.2
    assert c.ours_hi["acc_ratio_bitmod_over_float_w3"] == pytest.approx(1.15)
    assert "acc_ratio_ant_over_bitmod_w4" not in c.index  # no 4-bit rows in the table: no claim invented
    assert "135M" in c.stand_in["acc_ratio_olive_over_ant_w3"] and "12 windows of 512" in c.stand_in["acc_ratio_olive_over_ant_w3"]


def test_merge_adds_the_no_op_clip_rows_of_olive_only_where_clipped_runs_exist():
    def rows(config, dtype, bits, clip, nll):
        return [{"model": "m", "corpus": "c", "config": config, "dtype": dtype, "bits": bits, "group_size": 128,
                 "clip": clip, "calibration": "none", "window": w, "tokens": 10, "nll_sum": nll + w,
                 "kl_sum": 0.1, "top1_same": 5.0} for w in range(3)]
    a = pd.DataFrame(rows("float", "float", 16, False, 1.0) + rows("olive3", "olive", 3, False, 2.0)
                     + rows("olive4", "olive", 4, False, 3.0))
    b = pd.DataFrame(rows("float", "float", 16, False, 1.0) + rows("bitmod3+clip", "bitmod", 3, True, 4.0))
    m = A._merge_windows([a, b])
    assert sorted(m.config.unique()) == ["bitmod3+clip", "float", "olive3", "olive3+clip", "olive4"]
    o, oc = m[m.config == "olive3"], m[m.config == "olive3+clip"]
    assert oc.nll_sum.tolist() == o.nll_sum.tolist() and oc["clip"].all()
    assert len(m[m.config == "float"]) == 3


def test_orderings_of_baselines_alone_is_empty_not_an_error():
    import numpy as np

    rows = [{"model": "m", "corpus": "w", "config": c, "dtype": d, "bits": b, "clip": False, "calibration": "none",
             "group_size": 256, "bits_per_weight": 4.5, "weight_mse": 0.0, "quant_seconds": 0.0, "window": w,
             "tokens": 10, "nll_sum": 20.0 + w, "kl_sum": np.nan if d == "float" else 0.1, "top1_same": 9.0}
            for c, d, b in (("float", "float", 16), ("q4_k4", "q4_k", 4)) for w in range(3)]
    assert A.orderings(pd.DataFrame(rows), n_boot=50).empty
