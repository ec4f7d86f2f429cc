"""SFT (and GRPO) training loops on tiny models: they run, resume exactly, and refuse changed settings."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("reasoning_gym")

from effllm_lib.offload import train_sft as TS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny(folder, tied=True, seed=0):
    """A 1-layer Llama with a real BPE tokenizer and a ChatML template, saved as a transformers folder."""
    from test_offload_sft_data import _smol_like_tokenizer
    from test_offload_tags import tiny_llama

    tok = _smol_like_tokenizer()
    tok.pad_token = tok.eos_token
    model = tiny_llama(len(tok), tied, seed)
    model.config.max_position_embeddings = 2048
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


CFG = dict(n_train=6, batch_size=2, max_steps=4, save_steps=1, lr=1e-3, warmup=0.25, max_length=2048)


def test_sft_runs_logs_and_saves(tiny_dir, tmp_path, tmp_data):
    from effllm_lib import results

    out = TS.sft_(tiny_dir, tmp_path / "run", TS.SFTConfig(**CFG), results_name="sft_test")
    assert out["done"] and out["step"] == 4
    log = out["log"]
    assert list(log["step"]) == [1, 2, 3, 4] and log["loss"].notna().all()
    # warmup of ceil(0.25 * 4) = 1 step from 0, then cosine to 10% over the 3 others; step k runs at the
    # schedule's value k - 1: 0, peak, peak (0.1 + 0.9 (1 + cos(pi/3)) / 2), peak (0.1 + 0.9 (1 + cos(2 pi/3)) / 2)
    assert list(log["lr"]) == pytest.approx([0.0, 1e-3, 7.75e-4, 3.25e-4])
    saved = results.load("splitreason", "sft_test")
    assert saved.attrs["provenance"]["params"]["n_train"] == 6
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    cfg = TS.SFTConfig(**CFG)
    ref = TS.sft_(tiny_dir, tmp_path / "ref", cfg)
    first = TS.sft_(tiny_dir, tmp_path / "cut", cfg, max_minutes=0)  # stops after one step, with a checkpoint
    assert not first["done"] and first["step"] == 1 and first["final"] is None
    second = TS.sft_(tiny_dir, tmp_path / "cut", cfg)
    assert second["done"] and second["step"] == 4
    assert list(second["log"]["step"]) == [1, 2, 3, 4]  # the log carries over the resume
    torch.testing.assert_close(torch.tensor(list(second["log"]["loss"])), torch.tensor(list(ref["log"]["loss"])))
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ref["final"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second["final"]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_resume_with_other_settings_is_an_error(tiny_dir, tmp_path):
    TS.sft_(tiny_dir, tmp_path / "run", TS.SFTConfig(**CFG), max_minutes=0)
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        TS.sft_(tiny_dir, tmp_path / "run", TS.SFTConfig(**{**CFG, "lr": 2e-3}))


def test_tags_stage_adds_tokens_and_checks_annotations(tiny_dir, tmp_path):
    from effllm_lib.offload import sft_data
    from effllm_lib.offload.annotate import insert_tags

    items = sft_data.gsm_items("train", 6, seed=0)
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps({"id": t.id, "steps": insert_tags(t.steps, [(0, 10)])}) + "\n"
                           for t in items))
    cfg = TS.SFTConfig(**{**CFG, "stage": "tags", "annotations": str(ann), "max_steps": 2})
    out = TS.sft_(tiny_dir, tmp_path / "tags", cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_lib.offload.tags import check_tag_tokens

    m, t = AutoModelForCausalLM.from_pretrained(out["final"]), AutoTokenizer.from_pretrained(out["final"])
    check_tag_tokens(m, t)
    # a tagged model cannot be tagged again, nor go through the untagged stage
    with pytest.raises(ValueError, match="already has"):
        TS.sft_(out["final"], tmp_path / "again", cfg)
    with pytest.raises(ValueError, match="already has tag tokens"):
        TS.sft_(out["final"], tmp_path / "comp", TS.SFTConfig(**CFG))
    # annotations that change the text are refused
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": x.id, "steps": "<bigmodel>x</bigmodel>" + x.steps}) + "\n"
                           for x in items))
    with pytest.raises(ValueError, match="changes the trace"):
        TS.sft_(tiny_dir, tmp_path / "bad", TS.SFTConfig(**{**CFG, "stage": "tags", "annotations": str(bad)}))


def test_config_checks():
    with pytest.raises(ValueError, match="stage"):
        TS.SFTConfig(stage="rl")
    with pytest.raises(ValueError, match="annotations"):
        TS.SFTConfig(stage="tags")
    with pytest.raises(ValueError, match="batch_size"):
        TS.SFTConfig(batch_size=0)
    with pytest.raises(TypeError, match="SFTConfig"):
        TS.sft_("x", "y", {"lr": 1})


# -------------------------------------------------------------------------------------------------- GRPO
def test_attribute_segments_by_hand():
    from effllm_lib.offload.train_grpo import attribute_segments

    text = "a <bigmodel>BIG</bigmodel> b <bigmodel>CAP</bigmodel> c"
    segs = [("small", "a <bigmodel>"), ("big", "BIG"), ("small", " b <bigmodel>"), ("big", "CAP"),
            ("cap", "</bigmodel>"), ("small", " c")]
    got = attribute_segments(text, segs)
    assert "".join(t for _, t in got) == text
    assert got[2] == ("small", "</bigmodel>")  # the handoff's closing tag: the policy's probe chose it
    assert got[5] == ("cap", "</bigmodel>") and len(got) == 7
    with pytest.raises(RuntimeError, match="rebuild"):
        attribute_segments("xyz", [("small", "xy"), ("big", "q")])


def test_big_tokens_are_masked_in_a_real_controller_rollout():
    from test_offload_controller import make_tokenizer, run_tags

    from effllm_lib.offload.train_grpo import attribute_segments, completion_ids_and_mask

    toks = make_tokenizer(300, tags=True), make_tokenizer(280, tags=False)
    n_prompt = len(toks[0]("question: add 12 and 30. You always use <bigmodel>...</bigmodel> for the hard parts."
                           "\n<think>\n", add_special_tokens=False)["input_ids"])
    forced = {n_prompt + 5: "open", n_prompt + 16: "close", n_prompt + 30: "open", n_prompt + 33: "close"}
    gen = run_tags(toks, True, forced, same_tokenizer=False)
    pieces = attribute_segments(gen.text, gen.segments)
    ids, mask = completion_ids_and_mask(toks[0], pieces, gen.finished)
    assert toks[0].decode(ids) == gen.text and len(ids) == len(mask)
    big_text = "".join(t for who, t in gen.segments if who == "big")
    assert big_text and mask.count(0) == sum(len(toks[0](t, add_special_tokens=False)["input_ids"])
                                             for who, t in pieces if who != "small")
    # every masked token lies inside a <bigmodel> span, and each tag the policy wrote is unmasked
    open_id, close_id = toks[0].convert_tokens_to_ids(["<bigmodel>", "</bigmodel>"])
    inside = False
    for i, m in zip(ids, mask):
        if i == open_id:
            assert m == 1
            inside = True
        elif i == close_id:
            inside = False
        else:
            assert m == 1 or inside


def test_grpo_setup_checks():
    from effllm_lib.offload.train_grpo import GRPOSetup

    with pytest.raises(ValueError, match="multiple"):
        GRPOSetup(num_generations=3, batch_size=4)
    with pytest.raises(ValueError, match=">= 2"):
        GRPOSetup(num_generations=1, batch_size=4)


@pytest.fixture(scope="module")
def tagged_pair(tmp_path_factory):
    """A tagged tiny policy (through the SFT tags stage) and an untagged tiny big model with another tokenizer."""
    from effllm_lib.offload import sft_data
    from effllm_lib.offload.annotate import insert_tags

    root = tmp_path_factory.mktemp("pair")
    base = save_tiny(root / "base", seed=0)
    items = sft_data.gsm_items("train", 4, seed=0)
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps({"id": t.id, "steps": insert_tags(t.steps, [(0, 10)])}) + "\n"
                           for t in items))
    cfg = TS.SFTConfig(**{**CFG, "n_train": 4, "stage": "tags", "annotations": str(ann), "max_steps": 1})
    policy = TS.sft_(base, root / "sft", cfg)["final"]
    return policy, save_tiny(root / "big", tied=False, seed=5)


GRPO_SMALL = dict(n_train=4, num_generations=2, batch_size=2, max_new_tokens=24, chunk_tokens=4, probe_tokens=2,
                  max_big_segment=8, max_steps=2, save_steps=1, lr=1e-4)


def test_grpo_runs_logs_every_term_and_resumes(tagged_pair, tmp_path, tmp_data):
    from effllm_lib import results
    from effllm_lib.offload.train_grpo import GRPOSetup, grpo_

    policy, big = tagged_pair
    setup = GRPOSetup(**GRPO_SMALL)
    first = grpo_(policy, big, tmp_path / "g", setup, max_minutes=0)
    assert not first["done"] and first["step"] == 1
    out = grpo_(policy, big, tmp_path / "g", setup, results_name="grpo_test")
    assert out["done"] and out["step"] == 2
    log = results.load("splitreason", "grpo_test")
    for col in ("loss", "reward", "kl", "rewards/accuracy/mean", "rewards/format/mean", "rewards/tag_count/mean",
                "rewards/big_cost/mean", "rewards/tag_coverage/mean", "rewards/big_fraction/mean"):
        assert col in log.columns, col
    assert list(log["step"]) == [1, 2]
    with pytest.raises(ValueError, match="big_token_cost"):
        grpo_(policy, big, tmp_path / "g", GRPOSetup(**{**GRPO_SMALL, "big_token_cost": 0.01}))


# ---------------------------------------------------------------------------------------- CLI, eval, accelerate
def test_cli_pipeline_on_tiny_models(tiny_dir, tmp_path, tmp_data, capsys):
    from effllm_lib import results
    from effllm_lib.offload.train import main

    assert main(["sft", "--model", tiny_dir, "--out", str(tmp_path / "sft"), "--device", "cpu", "--n-train", "4",
                 "--batch-size", "2", "--max-steps", "2", "--max-length", "2048", "--tag", "_t"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"]
    final = str(tmp_path / "sft" / "final")
    assert main(["annotate", "--method", "gap", "--model", final, "--big", tiny_dir, "--device", "cpu",
                 "--out", str(tmp_path / "ann.jsonl"), "--n-train", "3", "--coverage", "0.2", "--tag", "_t"]) == 0
    rep = results.load("splitreason", "annotation_gap_t")
    assert len(rep) == 3 and (rep["coverage"] >= 0.2).all()
    rows = [json.loads(x) for x in (tmp_path / "ann.jsonl").read_text().splitlines()]
    assert all("<bigmodel>" in r["steps"] for r in rows)
    assert main(["eval", "--model", final, "--device", "cpu", "--label", "tiny", "--log", str(tmp_path / "e.jsonl"),
                 "--n", "3", "--max-new-tokens", "8", "--batch-size", "2", "--tag", "_t"]) == 0
    summary = results.load("splitreason", "trained_eval_tiny_t")
    assert summary["problems"].iloc[0] == 3 and 0 <= summary["pass@1"].iloc[0] <= 1
    # resumed: nothing is generated again, the log keeps 3 lines
    main(["eval", "--model", final, "--device", "cpu", "--label", "tiny", "--log", str(tmp_path / "e.jsonl"),
          "--n", "3", "--max-new-tokens", "8", "--tag", "_t"])
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3


def test_generate_alone_matches_unbatched_greedy(tiny_dir):
    """Left-padded batched generation equals one-prompt-at-a-time greedy decoding by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_lib.offload.evaluate_trained import generate_alone

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["<|im_start|>user\nadd 12 and 30<|im_end|>\n<|im_start|>assistant\n", "the big model writes"]
    got = generate_alone(model, tok, prompts, max_new_tokens=6)
    for p, g in zip(prompts, got):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert g["text"] == tok.decode(new) and g["tokens"] == len(new)


@pytest.mark.slow
def test_sft_under_accelerate_with_two_cpu_processes(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "EFFLLM_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data" / "results").mkdir(parents=True)
    (tmp_path / "data" / "paper").mkdir(parents=True)
    # --multi_gpu on a host without GPUs starts gloo CPU processes (--cpu would start just one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "effllm_lib.offload.train", "sft",
           "--model", tiny_dir, "--out", str(tmp_path / "ddp"), "--device", "cpu", "--n-train", "8",
           "--batch-size", "2", "--max-steps", "2", "--max-length", "2048"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    from effllm_lib import results

    os.environ["EFFLLM_DATA_DIR"] = str(tmp_path / "data")
    try:
        log = results.load("splitreason", "train_sft_competence")
    finally:
        del os.environ["EFFLLM_DATA_DIR"]
    assert log.attrs["provenance"]["params"]["world_size"] == 2
    assert list(log["step"]) == [1, 2]


@pytest.mark.slow
def test_grpo_under_accelerate_with_two_cpu_processes(tagged_pair, tmp_path):
    import os
    import subprocess
    import sys

    policy, big = tagged_pair
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EFFLLM_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data" / "results").mkdir(parents=True)
    (tmp_path / "data" / "paper").mkdir(parents=True)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in GRPO_SMALL.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
           "effllm_lib.offload.train", "grpo", "--model", policy, "--big", big, "--out", str(tmp_path / "g"),
           "--device", "cpu", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    from effllm_lib import results

    os.environ["EFFLLM_DATA_DIR"] = str(tmp_path / "data")
    try:
        log = results.load("splitreason", "train_grpo")
    finally:
        del os.environ["EFFLLM_DATA_DIR"]
    assert log.attrs["provenance"]["params"]["world_size"] == 2
    assert list(log["step"]) == [1, 2] and "rewards/big_cost/mean" in log.columns


def test_tiny_chat_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_lib.offload import sft_data
    from effllm_lib.offload.tiny_chat import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt, completion = sft_data.prompt_and_completion(tok, "2+2?", "<think>\n4\n</think>")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert completion.endswith("<|im_end|>") and tok.eos_token_id == model.config.eos_token_id
    # BPE merges: a gsm trace is fewer tokens than bytes, and decodes back to itself
    t = sft_data.gsm_items("train", 1)[0]
    ids = tok(t.steps, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(t.steps.encode()) and tok.decode(ids) == t.steps
