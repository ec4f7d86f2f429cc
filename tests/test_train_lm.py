"""The from-scratch LM: the article split, and that a few optimizer steps really reduce the loss."""

import math

import pytest
import torch

from effllm_lib import train_lm as T
from effllm_lib.models import ByteTokenizer

ARTICLES = [f"Article {i}. " + ("the cat sat on the mat and the dog ate the log. " * 6).strip() for i in range(20)]
TEXT = "\n\n".join(ARTICLES)
TINY = T.TrainConfig(layers=1, hidden=32, heads=2, kv_heads=1, seq_len=32, batch=8, steps=40, lr=1e-2, warmup=2)


def test_split_is_disjoint_complete_and_seeded():
    train, held = T.split_articles(TEXT, 0.2, seed=1)
    assert len(held) == 4 and len(train) == 16
    assert sorted(train + held) == sorted(ARTICLES)
    assert T.split_articles(TEXT, 0.2, seed=1) == (train, held)
    assert T.split_articles(TEXT, 0.2, seed=2)[1] != held


def test_a_few_steps_reduce_the_loss(tmp_path):
    r = T.train(TEXT, ByteTokenizer(), TINY, out=tmp_path / "m", progress=False)
    losses = [x["loss"] for x in r.log]
    # a fresh model predicts nearly uniformly: its first loss is close to ln(vocab)
    assert abs(losses[0] - math.log(259)) < 0.3
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    # the saved model gives the same logits as the trained one, and the held-out text is saved with it
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.tensor([ByteTokenizer().encode("the cat sat")])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, r.model(input_ids=x).logits, atol=1e-5)
    assert (tmp_path / "m" / "heldout.txt").read_text() == r.heldout_text
    assert r.heldout_text and r.heldout_text not in "\n\n".join(T.split_articles(TEXT, 0.05, 0)[0])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="articles"):
        T.split_articles("one article only", 0.1, 0)
    with pytest.raises(ValueError, match="heads"):
        T.TrainConfig(hidden=30, heads=4).check()
    with pytest.raises(ValueError, match="heldout_fraction"):
        T.TrainConfig(heldout_fraction=1.5).check()
    with pytest.raises(ValueError, match="tokens"):
        T.train("a b\n\nc d", ByteTokenizer(), TINY, progress=False)


def test_resumed_training_equals_one_uninterrupted_run(tmp_path):
    cfg = T.TrainConfig(**{**T.asdict(TINY), "steps": 12})
    whole = T.train(TEXT, ByteTokenizer(), cfg, out=tmp_path / "a", progress=False)
    # stop after the first step of each call (max_minutes 0), resume until done
    stop = T.TrainConfig(**{**T.asdict(cfg), "max_minutes": 0.0})
    r = T.train(TEXT, ByteTokenizer(), stop, out=tmp_path / "b", progress=False)
    calls = 1
    while r.stopped_early:
        assert (tmp_path / "b" / T.CHECKPOINT).is_file()
        r = T.train(TEXT, ByteTokenizer(), stop, out=tmp_path / "b", progress=False, resume=True)
        calls += 1
    assert calls == 12 and not (tmp_path / "b" / T.CHECKPOINT).exists()
    assert [x["loss"] for x in r.log] == pytest.approx([x["loss"] for x in whole.log], rel=1e-5)
    for p, q in zip(r.model.parameters(), whole.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_resume_needs_a_checkpoint_and_the_same_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        T.train(TEXT, ByteTokenizer(), TINY, out=tmp_path, progress=False, resume=True)
    stop = T.TrainConfig(**{**T.asdict(TINY), "max_minutes": 0.0})
    T.train(TEXT, ByteTokenizer(), stop, out=tmp_path, progress=False)
    other = T.TrainConfig(**{**T.asdict(stop), "lr": 5e-3})
    with pytest.raises(ValueError, match="another TrainConfig"):
        T.train(TEXT, ByteTokenizer(), other, out=tmp_path, progress=False, resume=True)


def test_100m_preset_size():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tok:  # SmolLM2's vocabulary size and special ids, without loading it
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

        def __len__(self):
            return 49152

    cfg = T.llama_config(T.PRESETS["100m"], Tok())
    assert isinstance(cfg, LlamaConfig)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert 100e6 < n < 130e6


def test_early_stopping_keeps_the_best_validation_step(tmp_path):
    """Validation articles come from the training side (never the held-out text); the saved model is the state of
    the step with the lowest validation loss, recomputed here from the saved model."""
    cfg = T.TrainConfig(**{**T.asdict(TINY), "steps": 12, "lr": 5e-2, "val_fraction": 0.25, "eval_every": 3})
    r = T.train(TEXT, ByteTokenizer(), cfg, out=tmp_path / "m", progress=False)
    evals = {x["step"]: x["val_loss"] for x in r.log if "val_loss" in x}
    assert sorted(evals) == [2, 5, 8, 11]
    assert r.best_step == min(evals, key=evals.get) and r.best_val_loss == min(evals.values())
    train_articles, held = T.split_articles(TEXT, cfg.heldout_fraction, cfg.seed)
    _, val_articles = T.split_articles("\n\n".join(train_articles), cfg.val_fraction, cfg.seed + 1)
    assert not set(val_articles) & set(held)
    tok = ByteTokenizer()
    val = torch.tensor([i for a in val_articles for i in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert T.validation_loss(loaded, val, cfg.seq_len, "cpu", False) == pytest.approx(r.best_val_loss, abs=1e-5)
    with pytest.raises(ValueError, match="validation split"):
        T.train(TEXT, ByteTokenizer(), T.TrainConfig(**{**T.asdict(cfg), "seq_len": 4096}), progress=False)
