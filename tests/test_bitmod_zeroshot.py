"""Batched zero-shot scoring and the paired accuracy-change interval (effllm_lib.bitmod.zeroshot)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from effllm_lib import eval as E
from effllm_lib.bitmod import zeroshot as Z

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batched_scores_equal_the_per_example_scorer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from test_bitmod_accuracy_cli import tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    examples = [E.MCExample(f"\nQ: What is {a} plus {b}?\nA:", [str(a + b), str(a * b + 7), "banana", "house"], {0})
                for a, b in [(1, 2), (12, 30), (7, 7), (250, 4), (3, 99)]]
    examples.append(E.MCExample("\nQ: Is the sky green?\nA:", ["yes", "no"], {1}))
    got = Z.score(model, tok, examples, batch_size=5)  # batches mix answers of different questions and lengths
    for ex, lp in zip(examples, got):
        assert lp == pytest.approx(E.choice_logprobs(model, tok, ex), rel=1e-4, abs=1e-4)
    ref = E.multiple_choice_accuracy(model, tok, examples, progress=False)
    assert Z.correct_flags(examples, got) == ref.correct


def _df(rows):
    return pd.DataFrame([{"model": "m", "task": t, "config": c, "correct": s, "n": len(s),
                          "accuracy": s.count("Y") / len(s), "chance": ch} for t, c, s, ch in rows])


def test_paired_change_hand_computed_and_its_width():
    df = _df([("a", "float", "YYYYYNNNNN", 0.5), ("a", "q", "YYYYNNNNNN", 0.5), ("a", "same", "YYYYYNNNNN", 0.5)])
    r = Z.paired_change(df, "q", ["a"], n_boot=2000)
    assert r["change_pp"] == pytest.approx(-10.0) and r["change_lo"] <= -10 <= r["change_hi"]
    assert r["discordant"] == pytest.approx(0.1) and r["questions"] == 10
    same = Z.paired_change(df, "same", ["a"], n_boot=500)
    assert same["change_pp"] == same["change_lo"] == same["change_hi"] == 0 and same["verdict"] == "loss < 0.5 pt"
    # 20,000 questions, 5% flip each way: the interval's half width is 1.96 sqrt(0.1 / n) = 0.438 points
    rng = np.random.default_rng(1)
    f = rng.random(20000) < 0.6
    flip = rng.random(20000) < 0.1
    q = np.where(flip, ~f, f)
    to_s = lambda a: "".join("Y" if x else "N" for x in a)  # noqa: E731
    big = _df([("a", "float", to_s(f[:12000]), 0.2), ("b", "float", to_s(f[12000:]), 0.2),
               ("a", "q", to_s(q[:12000]), 0.2), ("b", "q", to_s(q[12000:]), 0.2)])
    r = Z.paired_change(big, "q", ["a", "b"], n_boot=4000)
    expect = 100 * 1.96 * np.sqrt(flip.mean() - (q.astype(float) - f).mean() ** 2) / np.sqrt(20000)
    assert (r["change_hi"] - r["change_lo"]) / 2 == pytest.approx(expect, rel=0.1)
    assert r["change_pp"] == pytest.approx(100 * (q.astype(float) - f).mean())
    assert Z.questions_needed(0.1) == 15367  # 0.1 * (1.96 / 0.005)^2 = 15366.4
    with pytest.raises(ValueError, match="no tasks"):
        Z.paired_change(big, "q", [])


def test_above_chance_and_task_files(tmp_path):
    df = _df([("easy", "float", "Y" * 90 + "N" * 10, 0.5), ("coin", "float", "Y" * 52 + "N" * 48, 0.5),
              ("easy", "q", "Y" * 100, 0.5)])
    assert Z.above_chance(df) == ["easy"]
    for rel in ("one", "many/x", "many/y"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "task.json").write_text(json.dumps({"examples": []}))
    assert list(Z.task_files(tmp_path, ["one", "many"])) == ["one", "many/x", "many/y"]
    with pytest.raises(FileNotFoundError, match="no BIG-bench task 'nope'"):
        Z.task_files(tmp_path, ["nope"])


def test_cli_runs_from_files_and_summarizes(tmp_path):
    from test_bitmod_accuracy_cli import tiny_model_dir
    from effllm_lib import results

    folder = tiny_model_dir(tmp_path)
    tasks = tmp_path / "tasks" / "sums"
    tasks.mkdir(parents=True)
    ex = [{"input": f"What is {a} plus {b}?", "target_scores": {str(a + b): 1, str(a + b + 1): 0, "house": 0}}
          for a in range(4) for b in range(3)]
    (tasks / "task.json").write_text(json.dumps({"examples": ex}))
    common = ["--model", "tiny", "--model-dir", str(folder), "--tasks-dir", str(tmp_path / "tasks"), "--tasks",
              "sums", "--device", "cpu", "--out", str(tmp_path), "--scale", "ci", "--n-boot", "200"]
    assert Z.main(common + ["--configs", "float,bitmod4", "--tag", "a"]) == 0
    assert Z.main(common + ["--configs", "int_asym4", "--tag", "b"]) == 0
    a = results.read(tmp_path / "zeroshot_tiny_a.csv")
    assert list(a.config) == ["float", "bitmod4"] and (a.n == 12).all()
    with pytest.raises(SystemExit):
        Z.main(["--out", str(tmp_path)])
    assert Z.main(["--summarize", str(tmp_path / "zeroshot_tiny_a.csv"), str(tmp_path / "zeroshot_tiny_b.csv"),
                   "--out", str(tmp_path), "--scale", "ci", "--n-boot", "200"]) == 0
    summary = results.read(tmp_path / "zeroshot_paired_tiny.csv")
    # a random model is above chance nowhere: only the "all tasks" rows, one per quantized configuration
    assert list(summary.task_set) == ["all", "all"] and set(summary.config) == {"bitmod4", "int_asym4"}
    assert (summary.questions == 12).all()
