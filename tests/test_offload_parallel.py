"""export / run / merge of the parallel baselines on the CPU with tiny random models (2 workers, 2 problems)."""

import json

import pandas as pd
import pytest
import torch

from effllm_lib import results
from effllm_lib.offload import parallel as pl
from effllm_lib.offload.baselines import summarize
from effllm_lib.offload.problems import load_problems, read_log

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(small="tiny:llama:0", big="tiny:qwen2:1", device="cpu", dtype="float32", max_new_tokens=6,
            modes=["small only", "big only"], tp_decode_tokens=2, tp_repeats=1, chunk_tokens=4, probe_tokens=2,
            switch_chunk=2)


@pytest.fixture
def exported(tmp_path):
    path = tmp_path / "problems.jsonl"
    assert pl.main(["export-problems", "--source", "multistep_arithmetic", "--n", "2", "--seed", "1",
                    "--out", str(path)]) == 0
    return path


def _rewrite(path, records):
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_export_is_the_notebooks_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    pl.export_problems("multistep_arithmetic", 200, 1, path)
    rows = pl.read_problems(path)
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    # notebook 02 draws load_problems(source, n, seed=1); a shorter draw is a prefix of the longer one
    ref = load_problems("multistep_arithmetic", 13, seed=1)
    assert [(r["id"], r["question"], r["answer"]) for r in rows[:13]] == [(p.id, p.question, p.answer) for p in ref]
    # independent check of the gold answers: Python evaluates the integer expressions itself
    for r in rows[:50]:
        assert eval(r["question"].strip().rstrip("=")) == int(r["answer"])  # noqa: S307 - digits and + - * ( )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "source": "multistep_arithmetic", "question": "1 =", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="export-problems"):
        pl.read_problems(bad)


def test_bad_inputs_fail_before_any_worker(exported, tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(FileNotFoundError, match="small model: .*nope.gguf does not exist"):
        pl.main(["run", "--problems", str(exported), "--small-gguf", str(tmp_path / "nope.gguf"),
                 "--big-gguf", "tiny:qwen2:1", "--device", "cpu", "--log-dir", str(logs)])
    with pytest.raises(FileNotFoundError, match="big model"):
        pl.run(exported, "tiny:llama:0", str(tmp_path / "q.gguf"), logs, device="cpu")
    with pytest.raises(ValueError, match="tiny spec"):
        pl.run(exported, "tiny:gpt9:0", "tiny:qwen2:1", logs, device="cpu")
    with pytest.raises(ValueError, match="unknown modes"):
        pl.run(exported, "tiny:llama:0", "tiny:qwen2:1", logs, device="cpu", modes=["small alone"])
    with pytest.raises(FileNotFoundError, match="problems file"):
        pl.run(tmp_path / "none.jsonl", "tiny:llama:0", "tiny:qwen2:1", logs, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pl.run(exported, "tiny:llama:0", "tiny:qwen2:1", logs, device="cuda")
    assert not logs.exists()  # nothing was started


def test_run_two_worker_processes_then_merge(exported, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    monkeypatch.setenv("EFFLLM_COMMIT", "abc123")
    rec = pl.run(exported, log_dir=logs, workers=2, time_budget_s=120, **TINY)
    assert rec["worker_rc"] == {"0": 0, "1": 0} and rec["complete_after"] == 2
    rows = pl.read_problems(exported)
    for k in (0, 1):  # worker k took problem k
        for lab in TINY["modes"]:
            assert [r["problem_id"] for r in read_log(logs / f"w{k}" / pl.log_name(lab))] == [rows[k]["id"]]
        hw = json.loads((logs / f"w{k}" / "hardware.json").read_text())
        assert hw["device"] == "cpu" and hw["torch"] == torch.__version__
    tp = json.loads((logs / "throughput.json").read_text())
    assert tp["small"]["decode_tok_s"] > 0 and tp["big"]["prefill_tok_s"] > 0
    # the run-time score of one completion is wrong on purpose: merge must re-score it with the real scorer
    log = logs / "w1" / pl.log_name("big only")
    recs = read_log(log)
    recs[0]["text"] = f"so the answer is \\boxed{{{rows[1]['answer']}}}"
    recs[0]["correct"] = 0.0
    _rewrite(log, recs)
    out = tmp_path / "res" / "modes.csv"
    assert pl.main(["merge", "--log-dir", str(logs), "--problems", str(exported), "--out", str(out)]) == 0
    summ = results.read(out)
    ref_cols = summarize(pd.DataFrame([{"label": "a", "problem_id": "p", "correct": 1.0, "small_kept_tokens": 1,
                                        "big_kept_tokens": 0, "wall_s": 1.0, "finished": True,
                                        **{f"{m}_{k}": 0 for m in ("small", "big") for k in (
                                            "prefill_tokens", "decode_tokens", "rolled_back", "probe_prefill_tokens",
                                            "probe_decode_tokens", "prefill_s", "decode_s", "probe_s")}}])).columns
    assert list(summ.columns) == list(ref_cols)
    s = summ.set_index("mode")
    assert list(s.index) == ["small only", "big only"] and (s.problems == 2).all()
    assert s.loc["big only", "pass@1"] == 0.5 and s.loc["big only", "big_token_pct"] == 100
    assert s.loc["small only", "big_token_pct"] == 0
    meta = summ.attrs["provenance"]
    assert meta["extra"]["rescored_changed"] == 1 and meta["extra"]["problems_run"] == 2
    assert meta["extra"]["problems_requested"] == 2 and meta["params"]["max_new_tokens"] == 6
    assert meta["extra"]["run_hardware"]["device"] == "cpu"
    assert meta["extra"]["run_commits"] == ["abc123"] and meta["extra"]["run_calls"][0]["effllm_commit"] == "abc123"
    records = results.read(tmp_path / "res" / "modes_records.csv")
    assert len(records) == 4 and "text" not in records.columns and records.correct.sum() >= 1
    lat = results.read(tmp_path / "res" / "modes_latency.csv")
    assert list(lat["mode"]) == ["small only", "big only"] and (lat.sequential_s > 0).all()


def test_resume_after_partial_logs_and_settings_guard(exported, tmp_path, capsys):
    logs = tmp_path / "logs"
    first = pl.run(exported, log_dir=logs, workers=2, inline=True, throughput=False, **TINY)
    assert first["complete_after"] == 2
    # worker 0's completion is marked: a resume that regenerated it would lose the mark
    small0 = logs / "w0" / pl.log_name("small only")
    recs = read_log(small0)
    recs[0]["text"] = "KEEP " + recs[0]["text"]
    _rewrite(small0, recs)
    # worker 1 was killed while writing problem 2's big-model completion: the line is cut short
    big1 = logs / "w1" / pl.log_name("big only")
    whole = big1.read_bytes()
    big1.write_bytes(whole[: len(whole) // 2])
    second = pl.run(exported, log_dir=logs, workers=2, inline=True, throughput=False, **TINY)
    assert second["problems_assigned"] == 1 and second["complete_after"] == 2
    assert read_log(small0)[0]["text"].startswith("KEEP ")
    assert len(read_log(logs / "w1" / pl.log_name("small only"))) == 1  # not generated twice
    assert len(read_log(big1)) == 1
    history = json.loads((logs / "run.json").read_text())
    assert [c["problems_assigned"] for c in history["calls"]] == [2, 1]
    # another token budget on the same logs would mix two experiments
    with pytest.raises(ValueError, match="other settings"):
        pl.run(exported, log_dir=logs, workers=2, inline=True, throughput=False, **{**TINY, "max_new_tokens": 7})


def test_runs_without_math_verify(exported, tmp_path, monkeypatch):
    """The GPU machine has no math_verify: the strict scorer needs none, and scores as merge does."""
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    assert pl.run_time_scorer_name().startswith("strict")
    probs = pl.provisional_problems(pl.read_problems(exported))
    gold = probs[0].answer
    assert probs[0].score(f"thus \\boxed{{{gold}}}") == 1.0 and probs[0].score("\\boxed{12345}") == 0.0
    assert probs[0].score("no box, " + gold) == 0.0
    assert probs[0].score(f"\\boxed{{{probs[0].question.rstrip(' =')}}}") == 0.0  # the question restated
    logs = tmp_path / "logs"
    pl.run(exported, log_dir=logs, workers=2, inline=True, throughput=False, **TINY)
    hw = json.loads((logs / "w0" / "hardware.json").read_text())
    assert hw["scorer_at_run"].startswith("strict")
    assert len(read_log(logs / "w1" / pl.log_name("big only"))) == 1


def test_time_budget_stops_before_starting(exported, tmp_path):
    logs = tmp_path / "logs"
    rec = pl.run(exported, log_dir=logs, workers=1, inline=True, throughput=False, time_budget_s=1e-3, **TINY)
    assert rec["complete_after"] == 0
    assert json.loads((logs / "w0" / "progress.json").read_text())["stopped_for_time"] is True
    with pytest.raises(ValueError, match="no completions"):
        pl.merge(logs, out=tmp_path / "x.csv")


def test_sampling_in_float32_from_low_precision_logits():
    from effllm_lib.offload.controller import ModelStats, Session
    from effllm_lib.models import tiny_causal_lm

    model, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=32)
    logits = torch.randn(259, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    draws = []
    for _ in range(2):
        gen = torch.Generator(device="cpu").manual_seed(5)
        sess = Session("s", model, pl.TinyByteTokenizer(), ModelStats(), generator=gen, temperature=0.7)
        draws.append([sess.sample(logits) for _ in range(20)])
    # the reference: float32 softmax of the same bf16 values, the same seeded stream
    gen = torch.Generator(device="cpu").manual_seed(5)
    probs = torch.softmax(logits.float() / 0.7, dim=-1)
    ref = [int(torch.multinomial(probs, 1, generator=gen)) for _ in range(20)]
    assert draws[0] == draws[1] == ref


@pytest.mark.slow
def test_gguf_conversion_matches_the_packaged_model(tmp_path):
    """The workers' folder (GGUF dequantized here, bf16) against models.load_causal_lm (float32 reference)."""
    from effllm_lib import assets, models

    info = pl.prepare_model(pl.check_model_spec(str(assets.smollm2_gguf()), "small"), "bfloat16", tmp_path)
    assert info["packaged"] == "smollm2-135m" and info["hf_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model, tok = pl.load_model(info, "cpu", "bfloat16")
    ref, ref_tok = models.load_causal_lm("smollm2-135m")
    text = "(((-9 - 7) * (-1 + 0)) * ((5 + 5) * (-8 + 6))) = "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ref_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template
    with torch.inference_mode():
        a = model(input_ids=torch.tensor([ids])).logits.float()
        b = ref(input_ids=torch.tensor([ids])).logits
    assert model.dtype == torch.bfloat16
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.1 * b.abs().max()


@pytest.mark.slow
def test_workers_past_the_deadline_are_terminated(exported, tmp_path):
    """A worker whose problem outlasts budget + grace is terminated; the call still ends cleanly and on time."""
    logs = tmp_path / "logs"
    t0 = __import__("time").time()
    rec = pl.run(exported, log_dir=logs, workers=2, throughput=False, time_budget_s=8, grace_s=1,
                 **{**TINY, "max_new_tokens": 5000})
    assert sorted(rec["killed_at_deadline"]) == [0, 1] and rec["complete_after"] == 0
    assert __import__("time").time() - t0 < 8 + 1 + 5 + 3  # budget + grace + kill wait + slack
    assert json.loads((logs / "run.json").read_text())["calls"][0]["finished"] is True
