"""Tag tokens: one token each, rows initialised from the tag text's pieces, tied embeddings kept tied."""

import pytest
import torch

from effllm_lib.offload import tags as T
from test_offload_controller import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(vocab: int, tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_rows_are_the_mean_of_the_pieces(tied):
    tok = make_tokenizer(300, tags=False)
    model = tiny_llama(len(tok), tied)
    pieces = {t: tok(t, add_special_tokens=False)["input_ids"] for t in T.TAGS}
    assert all(len(p) > 1 for p in pieces.values())  # several tokens as plain text
    w_in = model.get_input_embeddings().weight.detach().clone()
    w_out = model.get_output_embeddings().weight.detach().clone()
    n_before = len(tok)
    info = T.add_tag_tokens(model, tok)
    assert info["tied"] is tied and info["ids"] == (n_before, n_before + 1)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == n_before + 2 and model.config.vocab_size == n_before + 2
    for tag, i in zip(T.TAGS, info["ids"]):
        expect = sum(w_in[j] for j in pieces[tag]) / len(pieces[tag])  # by hand, from the saved matrix
        torch.testing.assert_close(emb[i], expect)
        expect_out = sum(w_out[j] for j in pieces[tag]) / len(pieces[tag])
        torch.testing.assert_close(head[i], expect_out)
    torch.testing.assert_close(emb[:n_before], w_in)  # old rows untouched
    assert (head.data_ptr() == emb.data_ptr()) is tied
    # one token each, inside text, and decoding (even skipping special tokens) keeps them
    ids = tok("a <bigmodel>12+30</bigmodel> b", add_special_tokens=False)["input_ids"]
    assert ids.count(info["ids"][0]) == 1 and ids.count(info["ids"][1]) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "a <bigmodel>12+30</bigmodel> b"
    assert T.check_tag_tokens(model, tok) == info["ids"]
    # the model runs with the new ids
    model(input_ids=torch.tensor([ids]))


def test_spare_rows_are_used_not_shrunk():
    tok = make_tokenizer(300, tags=False)
    n = len(tok)
    model = tiny_llama(n + 8, tied=True)
    spare = model.get_input_embeddings().weight[n:].detach().clone()
    info = T.add_tag_tokens(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == n + 8 == info["rows"]  # not shrunk to n + 2
    assert info["ids"] == (n, n + 1)
    assert not torch.equal(model.get_input_embeddings().weight[n], spare[0])  # the spare row was overwritten
    torch.testing.assert_close(model.get_input_embeddings().weight[n + 2:], spare[2:])


def test_already_tagged_tokenizer_is_an_error():
    tok = make_tokenizer(300, tags=True)
    model = tiny_llama(len(tok), tied=True)
    with pytest.raises(ValueError, match="already has"):
        T.add_tag_tokens(model, tok)
    tok2 = make_tokenizer(300, tags=False)
    tok2.add_tokens(["<bigmodel>"])
    with pytest.raises(ValueError, match="only one"):
        T.add_tag_tokens(tiny_llama(len(tok2), True), tok2)


def test_check_needs_rows_and_tags():
    tok = make_tokenizer(300, tags=False)
    model = tiny_llama(len(tok), tied=True)
    with pytest.raises(ValueError, match="no <bigmodel>"):
        T.check_tag_tokens(model, tok)
    tok.add_tokens(["<bigmodel>", "</bigmodel>"])
    with pytest.raises(ValueError, match="embedding rows"):
        T.check_tag_tokens(model, tok)


def test_byte_tokenizer_is_a_type_error():
    from effllm_lib.models import ByteTokenizer

    with pytest.raises(TypeError, match="add_tokens"):
        T.add_tag_tokens(tiny_llama(259, True), ByteTokenizer())


def test_save_and_reload_keeps_tags(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = make_tokenizer(300, tags=False)
    model = tiny_llama(len(tok), tied=True)
    ids = T.add_tag_tokens(model, tok)["ids"]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert T.check_tag_tokens(m2, t2) == ids
    torch.testing.assert_close(m2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="already has"):
        T.add_tag_tokens(m2, t2)


def test_template_without_system_turn():
    """A Gemma-like template that rejects a system role: the tag hint rides in the user turn, so it works."""
    from effllm_lib.offload import sft_data as S

    tok = make_tokenizer(300, tags=False)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.eos_token = "<end_of_turn>"
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start>assistant\n{% endif %}")
    model = tiny_llama(len(tok), tied=True)
    T.add_tag_tokens(model, tok)
    prompt, completion = S.prompt_and_completion(tok, "What is 2+2?", "<think>\n<bigmodel>2+2=4</bigmodel>\n</think>",
                                                 tag_hint=True)
    assert "<bigmodel>...</bigmodel>" in prompt and prompt.startswith("<start>user\n")
    assert completion == "<think>\n<bigmodel>2+2=4</bigmodel>\n</think><end_of_turn>"


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gguf"), reason="needs gguf")
def test_real_smollm2_tokenizer_if_cached():
    from effllm_lib.models import _cached_tokenizer

    tok = _cached_tokenizer("llama")
    if tok is None:
        pytest.skip("SmolLM2's converted tokenizer is not cached")
    model = tiny_llama(len(tok), tied=True)
    info = T.add_tag_tokens(model, tok)
    assert info["tied"] and len(info["pieces"]["<bigmodel>"]) > 1
    text = "so <bigmodel>12 * 3 = 36</bigmodel> and"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == text
