"""Generation stops on every end-of-turn id a model declares, whatever transformers reads from the GGUF.

transformers 5.17 (the device's) reads SmolLM2's eos from the GGUF as ``<|im_start|>`` and Qwen2.5's as
``<|endoftext|>``; the committed GPU run then wrote past ``<|im_end|>``. The stop set must hold the chat's
end-of-turn token on any version, and the controller must stop there."""

import pytest
import torch

from effllm_lib.offload.controller import Controller, stop_token_ids


def _gguf_tokenizer(asset):
    from transformers import AutoTokenizer

    path = asset()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2_tok():
    from effllm_lib import assets

    return _gguf_tokenizer(assets.smollm2_gguf)


def test_stop_set_of_the_packaged_smollm2(smollm2_tok):
    tok = smollm2_tok
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    # the reference: the chat template closes an assistant turn with <|im_end|> (read from the rendered text)
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
                                       tokenize=False)
    assert "A<|im_end|>" in rendered
    assert im_end in stop_token_ids(tok)
    # what transformers 5.17 makes of this GGUF: eos = <|im_start|>. The end of turn is still a stop id.
    tok.eos_token = "<|im_start|>"
    try:
        ids = stop_token_ids(tok)
        assert {im_end, im_start} <= ids
    finally:
        tok.eos_token = "<|im_end|>"


def test_stop_ids_from_configs_lists_and_markers():
    from effllm_lib.offload.parallel import TinyByteTokenizer

    tok = TinyByteTokenizer()
    assert stop_token_ids(tok) == {tok.eos_token_id}

    class Cfg:
        def __init__(self, eos):
            self.eos_token_id = eos

    class Model:
        generation_config = Cfg([7, 9])   # a list, as Llama 3's generation config declares
        config = Cfg(11)

    assert stop_token_ids(tok, Model()) == {tok.eos_token_id, 7, 9, 11}


@pytest.mark.slow
@pytest.mark.parametrize("asset,marker", [("qwen25_gguf", "<|im_end|>"), ("gemma3_gguf", "<end_of_turn>")])
def test_stop_set_of_other_packaged_models(asset, marker):
    from effllm_lib import assets

    tok = _gguf_tokenizer(getattr(assets, asset))
    assert tok.convert_tokens_to_ids(marker) in stop_token_ids(tok)


@pytest.mark.slow
def test_generation_stops_at_end_of_turn(smollm2_tok, one_thread):
    """SmolLM2 (packaged GGUF), greedy, with the tokenizer as the GGUF gives it and with 5.17's eos: the controller
    stops where transformers' own generate, told to stop at <|im_end|>, stops."""
    from effllm_lib import models
    from effllm_lib.offload.problems import build_prompt

    model, _ = models.load_causal_lm("smollm2-135m")
    tok = smollm2_tok
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = build_prompt(tok, "What is 2 + 3? Reply with the number only.")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             eos_token_id=[im_end], pad_token_id=im_end)[0, ids.shape[1]:].tolist()
    assert ref[-1] == im_end, "the reference did not end its turn within 48 tokens"
    ref_text = tok.decode(ref[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for eos in ("<|im_end|>", "<|im_start|>"):  # 5.24's and 5.17's reading of the GGUF
        tok.eos_token = eos
        try:
            gen = Controller((model, tok), (model, tok), max_new_tokens=48).generate(prompt, mode="small")
        finally:
            tok.eos_token = "<|im_end|>"
        assert gen.finished and gen.text == ref_text
        assert "<|im_end|>" not in gen.text and gen.small.decode_tokens == len(ref) - 1
