"""Tiny randomly initialised causal LMs of every supported family, and a tiny tokenizer, built in code (no hub).

Sizes are chosen so that d_ff differs from d_model (a transposed weight then fails loudly on shape), plus one
square GPT-2 variant (d_ff == d_model) where only the module type can tell Conv1D from Linear orientation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
D_MODEL = 32
SENTENCES = [
    "The capital of France is Paris.",
    "Danielle Darrieux speaks French.",
    "The Eiffel Tower is located in Paris.",
    "Toko Yasuda plays the guitar.",
    "Autonomous University of Madrid is located in Spain.",
    "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
]
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Family:
    key: str  # test id
    spec: str  # expected ArchSpec.name
    model_class: str
    d_ff: int


def _config(key: str) -> Any:
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=None)
    if key == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=2, n_inner=96, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if key == "gpt2-square":
        return tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=2, n_inner=D_MODEL, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if key == "gptj":
        return tf.GPTJConfig(n_layer=2, n_embd=D_MODEL, n_head=2, n_inner=80, rotary_dim=8, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if key == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, **common)
    if key == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, **common)
    if key == "mistral":
        return tf.MistralConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=40, max_position_embeddings=64, **common)
    if key == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=56, max_position_embeddings=64, **common)
    raise KeyError(key)


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", "gpt2", "GPT2LMHeadModel", 96),
    Family("gpt2-square", "gpt2", "GPT2LMHeadModel", D_MODEL),
    Family("gptj", "gptj", "GPTJForCausalLM", 80),
    Family("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", 64),
    Family("llama", "llama", "LlamaForCausalLM", 48),
    Family("mistral", "llama", "MistralForCausalLM", 40),
    Family("qwen2", "llama", "Qwen2ForCausalLM", 56),
)
FAMILY_IDS = [f.key for f in FAMILIES]


def tiny_model(key: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(key))
    model.eval()
    return model


def tiny_tokenizer(*, padding_side: str = "left", pad: bool = False) -> Any:
    """A BPE tokenizer trained on a few sentences (vocab < VOCAB); eos only, no pad token unless asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", EOS] + (["<pad>"] if pad else [])
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=100, special_tokens=specials))
    kw = {"pad_token": "<pad>"} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>", **kw)
    fast.padding_side = padding_side
    assert len(fast) <= VOCAB
    return fast


def save_tiny(key: str, folder: Path, *, seed: int = 0, pad: bool = False) -> torch.nn.Module:
    """Write model + tokenizer with save_pretrained; returns the in-memory model for comparison."""
    model = tiny_model(key, seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer(pad=pad).save_pretrained(folder)
    return model


def token_batch(n: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, length), generator=g)  # [n, length]
