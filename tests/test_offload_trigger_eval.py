"""The trigger evaluation harness: every mode on the same problems, the summary's numbers by hand."""

import numpy as np
import pandas as pd
import pytest

from effllm_lib.offload.answers import strict_scorer
from effllm_lib.offload.problems import Problem
from effllm_lib.offload.trigger_eval import calibrate, run_eval, summarize, trigger_grid

from test_offload_triggers import pair  # noqa: F401  (the tiny Llama pair fixture)


def test_grid_labels_and_bad_budgets():
    labels = [g["label"] for g in trigger_grid((0.1, 0.3), ("entropy", "gap"), (0.3,))]
    assert labels == ["small only", "big only", "entropy 10%", "entropy 30%", "gap 10%", "gap 30%", "random 10%",
                      "random 30%", "step-spec 30%", "assisted"]
    with pytest.raises(ValueError, match="budgets"):
        trigger_grid((0.0,))


def test_run_eval_on_tiny_pair(pair, tmp_path):  # noqa: F811
    probs = [Problem(f"p{i}", "multistep_arithmetic", q, a, strict_scorer(a))
             for i, (q, a) in enumerate([("((1 + 2) * 3) =", "9"), ("(4 - 7) =", "-3")])]
    grid = trigger_grid((0.3,), ("entropy", "gap"), (0.3,))
    kw = dict(window=6, big_span=6, max_new_tokens=24, step_window=8)
    thr = calibrate(*pair, probs[:1], grid, **kw)
    assert set(thr) == {g["label"] for g in grid if g["method"] == "trigger"} | {"scores"}
    rec = run_eval(probs, *pair, tmp_path, grid, thr, **kw)
    assert len(rec) == len(probs) * len(grid)
    assert (rec.groupby("label").problem_id.nunique() == 2).all()
    # a rerun resumes from the logs: nothing new is generated
    again = run_eval(probs, *pair, tmp_path, grid, thr, **kw)
    assert len(again) == len(rec)
    summ = summarize(rec, n_boot=200)
    assert list(summ["mode"]) == [g["label"] for g in grid]
    assert summ.set_index("mode").loc["big only", "big_token_pct"] == 100.0
    assert summ.set_index("mode").loc["small only", "big_token_pct"] == 0.0


def test_summarize_by_hand():
    rows = []
    correct = {"small only": [0, 0, 1, 0], "entropy 20%": [1, 0, 1, 1], "random 20%": [0, 0, 1, 1]}
    for label, cs in correct.items():
        kind = label.split()[0]
        for i, c in enumerate(cs):
            rows.append({"label": label, "problem_id": f"p{i}", "correct": float(c), "small_kept_tokens": 30,
                         "big_kept_tokens": 0 if kind == "small" else 10, "wall_s": 2.0, "handoffs": i,
                         "finished": True, "small_decode_tokens": 30, "small_rolled_back": 0, "big_prefill_tokens": 0,
                         "big_decode_tokens": 0, "small_decode_s": 1.0, "big_prefill_s": 0.0, "big_decode_s": 0.0,
                         "method": "small" if kind == "small" else "trigger", "kind": kind,
                         "budget": np.nan if kind == "small" else 0.2})
    s = summarize(pd.DataFrame(rows), n_boot=2000).set_index("mode")
    assert s.loc["entropy 20%", "pass@1"] == 0.75 and s.loc["small only", "pass@1"] == 0.25
    assert s.loc["entropy 20%", "big_token_pct"] == pytest.approx(25.0)
    assert s.loc["entropy 20%", "handoffs_per_problem"] == 1.5
    assert s.loc["entropy 20%", "diff_vs_random"] == pytest.approx(0.25)
    assert s.loc["entropy 20%", "diff_lo"] <= 0.25 <= s.loc["entropy 20%", "diff_hi"]
    assert 0 <= s.loc["entropy 20%", "ci_lo"] <= 0.75 <= s.loc["entropy 20%", "ci_hi"] <= 1
    with pytest.raises(ValueError, match="columns"):
        summarize(pd.DataFrame(rows).drop(columns="handoffs"))


@pytest.mark.slow
def test_cli_with_two_workers_covers_every_problem_once(tmp_path):
    """Two worker processes split the problems (k, k + 2, ...); the summary has every problem in every mode."""
    from effllm_lib.offload.parallel import export_problems
    from effllm_lib.offload.problems import load_problems
    from effllm_lib.offload.trigger_eval import run_cli

    # the device reads exported problems (no assets there): the same problems, in the same order
    exported = export_problems("multistep_arithmetic", 5, 1, tmp_path / "problems.jsonl")
    argv = ["--small", "tiny:llama:1", "--big", "tiny:qwen2:2", "--n", "3", "--n-calib", "1",
            "--problems", str(exported), "--max-new-tokens", "6",
            "--window", "3", "--big-span", "3", "--step-window", "4", "--budgets", "0.3", "--no-assisted",
            "--workers", "2", "--log-dir", str(tmp_path), "--no-save", "--threads", "1"]
    summary = run_cli(argv)
    assert (summary.problems == 3).all() and len(summary) == 6
    from effllm_lib.offload.problems import read_log

    ids0 = {r["problem_id"] for r in read_log(tmp_path / "w0" / "small_only.jsonl")}
    ids1 = {r["problem_id"] for r in read_log(tmp_path / "w1" / "small_only.jsonl")}
    assert len(ids0) == 2 and len(ids1) == 1 and not ids0 & ids1
    assert ids0 | ids1 == {p.id for p in load_problems("multistep_arithmetic", 5, seed=1)[:3]}
    # a second call on the same logs reuses the saved thresholds and generates nothing new
    lines = sum(len(read_log(f)) for f in tmp_path.glob("w*/*.jsonl"))
    again = run_cli(argv)
    assert sum(len(read_log(f)) for f in tmp_path.glob("w*/*.jsonl")) == lines
    pd.testing.assert_frame_equal(again.drop(columns="wall_s_per_problem"), summary.drop(columns="wall_s_per_problem"))


@pytest.mark.slow
def test_cli_latency_tables(tmp_path, monkeypatch):
    """--latency measures each model alone once per log dir and writes measured vs simulated time per mode."""
    from effllm_lib import results
    from effllm_lib.offload.parallel import export_problems
    from effllm_lib.offload.trigger_eval import run_cli

    exported = export_problems("multistep_arithmetic", 2, 1, tmp_path / "problems.jsonl")
    (tmp_path / "data" / "results").mkdir(parents=True)
    monkeypatch.setenv("EFFLLM_DATA_DIR", str(tmp_path / "data"))  # results go there, not into the checkout
    argv = ["--small", "tiny:llama:1", "--big", "tiny:qwen2:2", "--n", "2", "--n-calib", "1",
            "--problems", str(exported), "--calib-problems", str(exported), "--max-new-tokens", "6",
            "--kinds", "gap", "--step-budgets",
            "--window", "3", "--big-span", "3", "--budgets", "0.3", "--no-assisted", "--scale", "ci",
            "--log-dir", str(tmp_path / "logs"), "--threads", "1", "--latency", "--latency-methods", "dynamic,static"]
    run_cli(argv)
    tp = results.read(results.results_path("splitreason", "throughput", "ci"))
    assert sorted(tp.model) == ["big", "big", "small", "small"] and (tp.status == "ok").all()
    lat = results.read(results.results_path("splitreason", "trigger_latency", "ci")).set_index("mode")
    assert list(lat.index) == ["small only", "big only", "gap 30%", "random 30%"]
    assert (lat.problems == 2).all() and (lat.sequential_s > 0).all() and (lat.pipelined_sim_s > 0).all()
    assert (lat.measured_s > 0).all()
    assert (tmp_path / "logs" / "throughput.json").is_file()  # a resume reuses it


@pytest.mark.slow  # reasoning-gym's dataset build: ~25 s
def test_held_out_problems_are_disjoint_interleaved_and_held_out(tmp_path):
    import json

    from effllm_lib.offload.parallel import provisional_problems, read_problems
    from effllm_lib.offload.problems import load_problems
    from effllm_lib.offload.sft_data import held_out_templates
    from effllm_lib.offload.trigger_eval import HELD_OUT_SOURCES, held_out_problems

    ev, cal = held_out_problems(4, 2)
    assert len(ev) == 12 and len(cal) == 6
    assert [r["source"] for r in ev[:3]] == list(HELD_OUT_SOURCES)  # interleaved
    assert not {r["id"] for r in ev} & {r["id"] for r in cal}
    assert all(r["template"] in held_out_templates() for r in ev + cal if r["source"] == "gsm_symbolic")
    # the multistep draw is notebook 02's (load_problems with seed 1), first rows first
    assert [r["id"] for r in ev if r["source"] == "multistep_arithmetic"] == \
        [p.id for p in load_problems("multistep_arithmetic", 4, seed=1)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ev))
    probs = provisional_problems(read_problems(path))  # what the device reads
    assert [p.id for p in probs] == [r["id"] for r in ev]
    assert probs[0].score(f"so \\boxed{{{ev[0]['answer']}}}") == 1.0
    with pytest.raises(ValueError, match="n_per_source"):
        held_out_problems(0, 1)
