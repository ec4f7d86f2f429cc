"""SFT (and GRPO) training loops on tiny models: they run, resume exactly, and refuse changed settings."""

import json

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
