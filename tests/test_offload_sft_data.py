"""SFT data: the template split never leaks, traces are verified, the loss is on the completion only."""

import re
from random import Random

import pytest

pytest.importorskip("reasoning_gym")

from effllm_lib.models import ByteTokenizer  # noqa: E402
from effllm_lib.offload import sft_data as S  # noqa: E402
from effllm_lib.offload.problems import extract_boxed  # noqa: E402


@pytest.fixture(scope="module")
def train_items():
    return S.gsm_items("train", 60, seed=3)


@pytest.fixture(scope="module")
def held_items():
    return S.gsm_items("held_out", 30, seed=3)


def test_split_is_a_partition_of_the_usable_templates():
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    sp = S.template_split()
    assert set(sp["train"]).isdisjoint(sp["held_out"])
    assert set(sp["train"]) | set(sp["held_out"]) == set(tasks_ok)
    assert len(sp["held_out"]) == round(len(tasks_ok) / 3)
    assert S.template_split() == sp  # fixed, not drawn anew
    assert sp["held_out"] == S.HELD_OUT  # the recorded copy the GPU machine checks exports with


def test_export_and_read_back(tmp_path, monkeypatch):
    items = S.gsm_items("held_out", 5, seed=2)
    path = S.export_items("held_out", 5, 2, tmp_path)
    monkeypatch.setenv(S.ITEMS_DIR_ENV, str(tmp_path))
    import reasoning_gym

    monkeypatch.setattr(reasoning_gym, "create_dataset", None)  # the export must not need reasoning-gym
    assert S.gsm_items("held_out", 5, seed=2) == items
    # an export whose items come from the other split's templates is refused
    path.rename(tmp_path / S.items_file_name("train", 5, 2))
    with pytest.raises(ValueError, match="other split"):
        S.gsm_items("train", 5, seed=2)


def _regenerated_question(template: int, seed: int, index: int) -> str:
    """The question of item ``index`` rebuilt from the template's generator alone (reasoning-gym seeds item i
    with Random(seed + i) and appends a fixed instruction): an independent check of the template label."""
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    mod = generators_00_49 if template < 50 else generators_50_99
    q = getattr(mod, f"generate_{template}")(Random(seed + index), 1.0)["question"]
    return q + " Give the result as your final answer. Do not include units."


def test_no_held_out_template_in_train(train_items, held_items):
    held = set(S.held_out_templates())
    for split, items in (("train", train_items), ("held_out", held_items)):
        for t in items:
            index = int(t.id.rsplit("/", 1)[1])
            # the label is right: the template's own generator rebuilds the very question
            assert _regenerated_question(t.template, 3, index) == t.question
            assert (t.template in held) == (split == "held_out")
    assert not {t.question for t in train_items} & {t.question for t in held_items}
    assert len({t.template for t in train_items}) > 20  # many train templates, not a handful


def test_completions_end_in_the_gold_boxed_answer(train_items):
    from effllm_lib.offload.rewards import accuracy_reward

    for t in train_items:
        c = t.completion()
        assert c.startswith("<think>\n") and c.endswith("\\boxed{" + t.answer + "}\n</answer>")
        assert extract_boxed(c) == t.answer
        assert accuracy_reward(c, t.answer) == 1.0
        # the last step of the reference reasoning computes the answer itself
        last_numbers = re.findall(r"-?\d+(?:\.\d+)?", t.steps.splitlines()[-1].replace(",", ""))
        assert float(last_numbers[-1]) == float(t.answer)


def test_unverified_trace_is_dropped():
    assert S._verified_steps("a = 3\n#### 4", "3") is None
    assert S._verified_steps("#### 3", "3") is None  # no steps
    assert S._verified_steps("a = 1,000\n#### 1,000", "1000") == "a = 1,000"


def test_deterministic_and_bad_input():
    a = S.gsm_items("train", 5, seed=1)
    assert [x.id for x in a] == [x.id for x in S.gsm_items("train", 5, seed=1)]
    with pytest.raises(ValueError, match="split"):
        S.gsm_items("test", 5)
    with pytest.raises(ValueError, match="n must"):
        S.gsm_items("train", 0)


def _smol_like_tokenizer():
    """A real fast tokenizer with SmolLM2's chat template (ChatML with a default system turn)."""
    from test_offload_controller import make_tokenizer

    tok = make_tokenizer(300, tags=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_chat_format_and_completion_only_labels(train_items):
    tok = _smol_like_tokenizer()
    t = train_items[0]
    prompt, completion = S.prompt_and_completion(tok, t.question, t.completion())
    assert prompt.endswith("<|im_start|>assistant\n") and "You are helpful" in prompt
    assert completion == t.completion() + "<|im_end|>"  # ends at the end-of-turn, no trailing newline
    ex = S.sft_examples(tok, [t])[0]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert all(x != -100 for x in ex["labels"][n_prompt:])
    assert tok.decode(ex["labels"][n_prompt:]) == completion
    assert ex["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="max_length"):
        S.sft_examples(tok, [t], max_length=10)


def test_plain_tokenizer_appends_eos(train_items):
    tok = ByteTokenizer()
    prompt, completion = S.prompt_and_completion(tok, "q?", "<think>\nx\n</think>")
    assert prompt == "q?\nPut your final answer within \\boxed{}.\n" and completion.endswith("<eos>")


def test_template_rewriting_history_is_an_error(train_items):
    tok = _smol_like_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.last and m['role'] == 'user' %}LAST {% endif %}"
                         "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        S.prompt_and_completion(tok, "q", "c")
