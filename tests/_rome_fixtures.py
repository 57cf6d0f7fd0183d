"""Tiny models, tokenizer, requests and statistics text for the ROME-family and statistics tests (built in code).

The tokenizer is a byte-level BPE that prepends BOS ("<|endoftext|>", also the pad token), like the world model's;
its small vocabulary splits the made-up names into several tokens. Models: a 3-layer GPT-2 (Conv1D, d_ff 128) and a
3-layer Llama (Linear down_proj, d_ff 48), randomly initialised from a seed.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from seqedit.types import EditRequest

BOS = "<|endoftext|>"
_SYLLABLES = ["ka", "lo", "mi", "ran", "tu", "vel", "zor", "pha", "ish", "dor", "ne", "qua", "bri", "sto", "len"]
_RELATIONS = [
    "The capital of {} is {}.", "{} plays the sport of {}.", "The mother tongue of {} is {}.",
    "{} works for {}.", "{} was born in {}.", "{} is located in {}.",
]


def name(rng: random.Random, parts: int = 2) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(parts))


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Made-up fact sentences with many distinct token contexts (full-rank second moments at width 32)."""
    rng = random.Random(seed)
    return [rng.choice(_RELATIONS).format(name(rng), name(rng, 1)) for _ in range(n)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS)
    fast.padding_side = "right"
    return fast


def make_gpt2(vocab: int, seed: int = 0, n_layer: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_layer=n_layer, n_embd=32, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def make_llama(vocab: int, seed: int = 0, n_layer: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_model(kind: str, vocab: int, seed: int = 0):
    return {"gpt2": make_gpt2, "llama": make_llama}[kind](vocab, seed)


def requests() -> list[EditRequest]:
    return [
        EditRequest("r1", "The capital of {} is", "Kalomi Ranvel", "Zorpha", "Tudor",
                    paraphrase_prompts=("Kalomi Ranvel's capital is",)),
        EditRequest("r2", "{} plays the sport of", "Quabri Stolen", "tennis", "hockey"),
    ]


def write_text(folder: Path, n: int = 300, seed: int = 1, name: str = "stats.txt") -> Path:
    path = Path(folder) / name
    path.write_text("\n".join(corpus(n, seed)) + "\n")
    return path


def prepared_editor(name, model, tok, text, tmp_path, *, fast, seed=0, **options):
    """Editor `name` built from `fast` + `options` (nested sections as mappings) and prepared on `model`, with its
    run folder and statistics cache under `tmp_path` and second moments from `text`."""
    from seqedit.builder import build_dataclass
    from seqedit.editors.base import EditorContext, get_editor

    cls = get_editor(name)
    editor = cls(build_dataclass(cls.Config, {**fast, **options}))
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    editor.prepare(model, tok, EditorContext.for_model(model, seed=seed, run_dir=run_dir, cache_dir=tmp_path / "cache",
                                                       stats_text=(text,)))
    return editor
