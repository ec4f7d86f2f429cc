"""The accuracy sweep as a resumable run: a call stopped by its budget leaves valid partial tables, a second call
with --resume finishes them, and the result is the one-shot run's table; configurations that provably give the
same quantized weights as an earlier one are copied, and the proof is checked here by computing both."""

import pandas as pd
import pytest
import torch

from effllm_lib import results
from effllm_lib.bitmod import accuracy as A
from effllm_lib.bitmod import quantize as Q

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ["quant_seconds"]  # wall-clock times: the only columns two runs may differ in


# ------------------------------------------------------------------------------------ which configs are the same
def _layer(rows=96, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / torch.randn(rows, cols, generator=g).abs().clamp(min=0.2).sqrt()
    act = torch.rand(cols, generator=g).pow(8) * 10  # channel importances over many orders of magnitude
    # rows where MX's clipping pays: per block of 32 one value just above 1 (a power of two) and the rest
    # halfway between two steps of the scale without clipping but exact at half that scale (one clipping step):
    # 0.1875 for FP4 (scale 1/8), 0.125 for FP3 (scale 1/4)
    for row, v in ((0, 0.1875), (1, 0.125)):
        w[row] = v * torch.sign(torch.randn(cols, generator=g))
        w[row, ::32] = 1.0001
    return w, act


def _valid(dtype, bits):
    try:
        Q.BitMoDConfig(bits=bits, dtype=dtype)
    except ValueError:
        return False
    return True


CASES = [(d, b, c) for d in Q.DTYPES for b in (3, 4) for c in (False, True) if _valid(d, b)]


@pytest.mark.parametrize("dtype,bits,clip", CASES)
def test_act_calibration_is_skipped_exactly_where_it_changes_nothing(dtype, bits, clip):
    # brute force: quantize with and without the activation weights; the skip rule must say "same" exactly
    # when the weights come out bit for bit the same (and on this layer every other case does differ)
    w, act = _layer()
    plain = Q.quantize_tensor(w, bits, dtype, 128, clip=clip).weight
    weighted = Q.quantize_tensor(w, bits, dtype, 128, clip=clip, col_weight=act).weight
    assert torch.equal(plain, weighted) == Q.calibration_ignored(dtype, bits, clip)


@pytest.mark.parametrize("dtype,bits", sorted({(d, b) for d, b, _ in CASES}))
def test_clip_is_skipped_exactly_where_it_changes_nothing(dtype, bits):
    w, act = _layer(seed=1)
    for cw in (None, act):
        same = torch.equal(Q.quantize_tensor(w, bits, dtype, 128, col_weight=cw).weight,
                           Q.quantize_tensor(w, bits, dtype, 128, clip=True, col_weight=cw).weight)
        assert same == Q.clip_ignored(dtype, bits)
    assert Q.clip_ignored(dtype, bits) == (dtype in ("olive", "iq4_nl", "q4_k", "q3_k"))  # own scale searches


def test_same_as_chains_clip_and_act():
    cfg = lambda d, b, c=False, cal="none": Q.BitMoDConfig(bits=b, dtype=d, clip=c, calibration=cal)  # noqa: E731
    assert A.same_as(cfg("int_asym", 3, cal="act")) == cfg("int_asym", 3)
    assert A.same_as(cfg("int_asym", 3, True, "act")) is None  # the clipping search weighs the ratios
    assert A.same_as(cfg("olive", 3, True, "act")) == cfg("olive", 3, False, "act")
    assert A.same_as(cfg("q4_k", 4, True, "act")) == cfg("q4_k", 4)
    assert A.same_as(cfg("bitmod", 3, cal="act")) is None and A.same_as(cfg("iq4_nl", 4, cal="act")) is None
    assert A.same_as(cfg("nf4", 4, cal="awq")) is None and A.same_as(None) is None


# ---------------------------------------------------------------------------------------------- kl_sweep level
def _tiny():
    from effllm_lib.models import tiny_causal_lm

    return tiny_causal_lm("llama", seed=0, tokenizer="byte")


TEXT = "the quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun. " * 30


def test_sweep_stopped_and_resumed_equals_one_shot_run():
    model, tok = _tiny()
    calib = torch.tensor([list(range(40, 72)), list(range(72, 104))])
    cfgs = A.sweep_configs(("int_asym", "bitmod", "olive"), bits=(3,), clips=(False, True),
                           calibrations=("none", "act"))
    kw = dict(seq_len=32, max_windows=5, kl_windows=3, calibration_windows=calib, calibration_sample=32)
    one = A.kl_sweep(model, tok, {"t": TEXT}, cfgs, **kw)
    assert one.attrs["remaining"] == []
    first = A.kl_sweep(model, tok, {"t": TEXT}, cfgs, stop_before=lambda c, t: len(t) >= 3, **kw)
    assert first.attrs["remaining"] and set(first.config) < set(one.config)
    second = A.kl_sweep(model, tok, {"t": TEXT}, cfgs, previous=first, stop_before=lambda c, t: len(t) >= 2, **kw)
    final = A.kl_sweep(model, tok, {"t": TEXT}, cfgs, previous=second, **kw)
    assert final.attrs["remaining"] == []
    pd.testing.assert_frame_equal(final.drop(columns=TIMING), one.drop(columns=TIMING))
    # the copies: int_asym3+act is int_asym3 (one candidate, one ratio), olive3+clip+act is olive3+act
    for a, b in (("int_asym3+act", "int_asym3"), ("olive3+clip+act", "olive3+act"), ("olive3+clip", "olive3")):
        ra, rb = (one[one.config == c].reset_index(drop=True) for c in (a, b))
        assert ra.nll_sum.tolist() == rb.nll_sum.tolist() and ra.kl_sum.equals(rb.kl_sum)
    r = one.drop_duplicates("config").set_index("config")
    assert r.calibration["int_asym3+act"] == "act" and not r["clip"]["int_asym3+act"]
    # ... while the activation weighting does change BitMoD's choice of type
    assert one[one.config == "bitmod3+act"].nll_sum.tolist() != one[one.config == "bitmod3"].nll_sum.tolist()


def test_budget_estimate_and_first_configuration():
    b = A._Budget(start=0.0, max_minutes=1.0, max_configs=None, reserve_seconds=10.0)
    cfg = Q.BitMoDConfig(bits=3, dtype="bitmod", clip=True)  # 4 types x 10 ratios = 40 passes
    assert A.search_passes(cfg) == 40 and A.search_passes(Q.BitMoDConfig(bits=3, dtype="olive", clip=True)) == 12
    t = [{"config": "bitmod3", "calibration": "none", "quant_seconds": 2.0, "eval_seconds": 3.0, "passes": 4},
         {"config": "int_asym3", "calibration": "none", "quant_seconds": 1.0, "eval_seconds": 5.0, "passes": 1}]
    assert b.estimate(cfg, t) == pytest.approx(40 * 1.0 + 5.0)  # slowest per pass, slowest evaluation
    gptq = Q.BitMoDConfig(bits=3, dtype="bitmod", clip=True, calibration="gptq")
    k = A._Budget.GPTQ_LOOP_PASSES
    unseen = max(2.0 * (40 + k) / (4 + k), 1.0 * (40 + k) / (1 + k)) + 5.0 + A._Budget.UNSEEN_SECONDS
    assert b.estimate(gptq, t) == pytest.approx(unseen)  # no GPTQ timed yet: the others' rates and a margin
    t_g = t + [{"config": "int_asym3+gptq", "calibration": "gptq", "quant_seconds": 20.0, "eval_seconds": 5.0,
                "passes": 1}]
    assert b.estimate(gptq, t_g) == pytest.approx(20.0 * (40 + k) / (1 + k) + 5.0)  # GPTQ's own timing once seen
    awq = Q.BitMoDConfig(bits=3, dtype="bitmod", calibration="awq")
    assert A.search_passes(awq) == 4 + 20 * 4
    assert b(cfg, []) is False  # the first configuration of a call always runs
    import time

    b.start = time.perf_counter()  # 60 - 10 s left, 45 s needed: fits; 4 s later it still fits, 20 s later not
    assert b(cfg, t) is False
    b.start -= 20
    assert b(cfg, t) is True
    assert A._Budget(0.0, None, 2, 0)(cfg, t) is True and A._Budget(0.0, None, 3, 0)(cfg, t) is False
    with pytest.raises(ValueError, match="max-minutes"):
        A._Budget(0.0, 0, None, 0)


from test_bitmod_accuracy_cli import tiny_model_dir  # noqa: E402


# ------------------------------------------------------------------------------------------------- the CLI
def _model_dir(tmp_path):
    """A 1-layer Llama of hidden 32 with SmolLM2's tokenizer (test_bitmod_accuracy_cli's, smaller)."""
    return tiny_model_dir(tmp_path, hidden=32)


@pytest.mark.slow  # ~40 s: two runs of 7 configurations, each quantizing a 49152 x 32 head
def test_cli_resume_after_max_configs_equals_one_shot(tmp_path):
    from effllm_lib import assets

    folder = _model_dir(tmp_path)
    wiki, austen = tmp_path / "wiki.txt", tmp_path / "austen.txt"
    wiki.write_text(assets.wikipedia_text("ci")[:3000])
    austen.write_text(assets.austen_text("ci")[:3000])
    common = ["--model", "tiny", "--model-dir", str(folder), "--text", f"wiki={wiki}", "--calib-text", str(austen),
              "--calib-windows", "2", "--calib-seq-len", "32", "--calib-sample", "32", "--max-windows", "4",
              "--kl-windows", "2", "--seq-len", "32", "--methods", "int_asym,nf4,bitmod", "--bits", "4",
              "--clip", "0", "--calibration", "none,act", "--device", "cpu", "--scale", "ci", "--n-boot", "200"]
    one, split = tmp_path / "one", tmp_path / "split"
    assert A.main(common + ["--out", str(one)]) == 0
    assert A.main(common + ["--out", str(split), "--max-configs", "2"]) == 0
    part = results.read(split / "windows_tiny.csv")
    (tmp_path / "partial").mkdir()
    partial_copy = tmp_path / "partial" / "windows_tiny.csv"
    partial_copy.write_text((split / "windows_tiny.csv").read_text())
    meta = part.attrs["provenance"]["params"]
    assert meta["complete"] is False and meta["configs_done"] == ["float", "int_asym4", "nf44"]
    assert len(meta["configs_planned"]) == 7 and "max_configs" not in meta
    assert not (split / "orderings_tiny.csv").exists()
    assert results.read(split / "accuracy_tiny.csv").attrs["provenance"]["params"]["complete"] is False
    with pytest.raises(ValueError, match="seq_len_used"):  # another setting: refused, not mixed in
        A.main([*common[:common.index("--seq-len")], "--seq-len", "16", *common[common.index("--seq-len") + 2:],
                "--out", str(split), "--resume"])
    assert A.main(common + ["--out", str(split), "--resume"]) == 0
    for name in ("windows_tiny", "accuracy_tiny", "orderings_tiny"):
        a, b = results.read(one / f"{name}.csv"), results.read(split / f"{name}.csv")
        keep = [c for c in a.columns if c not in TIMING]
        pd.testing.assert_frame_equal(a[keep], b[keep])
        assert b.attrs["provenance"]["params"]["complete"] is True
    w = results.read(split / "windows_tiny.csv")
    assert w[w.config == "int_asym4+act"].nll_sum.tolist() == w[w.config == "int_asym4"].nll_sum.tolist()
    # --summarize of a partial windows file: the accuracy table, but no orderings, and it says so
    merged = tmp_path / "merged"
    assert A.main(["--summarize", str(partial_copy), "--out", str(merged), "--scale", "ci", "--n-boot", "50"]) == 0
    assert not (merged / "orderings_tiny.csv").exists()
    assert results.read(merged / "accuracy_tiny.csv").attrs["provenance"]["params"]["complete"] is False


def test_stopped_sweep_keeps_the_earlier_configurations_and_lists_only_the_missing():
    model, tok = _tiny()
    kw = dict(seq_len=32, max_windows=3, kl_windows=2)
    mk = lambda d: Q.BitMoDConfig(bits=3, dtype=d)  # noqa: E731
    earlier = A.kl_sweep(model, tok, {"t": TEXT}, [mk("bitmod")], **kw)
    df = A.kl_sweep(model, tok, {"t": TEXT}, [mk("int_asym"), mk("olive"), mk("bitmod")], previous=earlier,
                    stop_before=lambda c, t: len(t) >= 1, **kw)
    assert df.attrs["remaining"] == ["olive3"]
    assert list(dict.fromkeys(df.config)) == ["float", "int_asym3", "bitmod3"]
    pd.testing.assert_frame_equal(df[df.config == "bitmod3"].reset_index(drop=True),
                                  earlier[earlier.config == "bitmod3"].reset_index(drop=True))
