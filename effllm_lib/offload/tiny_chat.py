"""A tiny random chat model saved as a transformers folder: the CI stand-in for SmolLM2 in the training pipeline.

The training steps need what ``models.tiny_causal_lm``'s byte tokenizer lacks: a real fast tokenizer (added tokens,
offsets), a ChatML chat template with a default system turn like SmolLM2's, and an end-of-turn token. The byte-level
BPE vocabulary is trained on a few gsm_symbolic-style sentences (a trace is still most of a token per byte).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["First find how long it takes to peel the onions: 36 onion / 4 onion/minute = 9 minutes\n",
           "Then multiply the number of batches by the time per batch: 3 batches * 7 minutes/batch = 21 minutes\n",
           "<think>\nThe answer is computed step by step\n</think>\n<answer>\n\\boxed{42}\n</answer>",
           "How many pebbles did Robert end up with? Give the result as your final answer. Do not include units.",
           "Put your final answer within \\boxed{}. 0 1 2 3 4 5 6 7 8 9 + - * / = $ % ."]


def tiny_chat_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    return fast


def save_tiny_chat_model(folder: str | os.PathLike, *, seed: int = 0, tied: bool = True, hidden: int = 32,
                         layers: int = 1) -> str:
    """Write a random Llama (``layers`` x ``hidden``) + the tiny chat tokenizer to ``folder``; returns its path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
