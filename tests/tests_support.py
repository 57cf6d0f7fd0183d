"""Builders for tiny models and tokenizers used across tests (imported by conftest and test files)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SENTENCES = [
    "The capital of Varokel is Mirandu",
    "The capital of Tesselin is Quorath",
    "Danora Keltiss plays the sport of hockey",
    "Bramwick Oltey plays the sport of tennis",
    "The mother tongue of Selvane Irtu is Ovarish",
    "Kelmo Rastavin works for Dantrel Industries",
    "Ivo Parnassek plays the instrument flute",
    "Quorath is located in the continent of Arvalia",
    "The native language of Teodric Vanhalt is Sumerish",
    "Lisara Moventi was born in Tesselin",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.padding_side = "right"
    return fast


def make_tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    return model


def counterfact_records(n: int = 12) -> list[dict]:
    """Hand-made CounterFact-format records over the SENTENCES vocabulary."""
    subjects = ["Varokel", "Tesselin", "Danora Keltiss", "Bramwick Oltey", "Selvane Irtu", "Kelmo Rastavin",
                "Ivo Parnassek", "Quorath", "Teodric Vanhalt", "Lisara Moventi", "Mirandu", "Arvalia"]
    objects = ["Mirandu", "Quorath", "hockey", "tennis", "Ovarish", "flute"]
    recs = []
    for i in range(n):
        s = subjects[i % len(subjects)] + ("" if i < len(subjects) else f" {i}")
        true, new = objects[i % len(objects)], objects[(i + 1) % len(objects)]
        recs.append({
            "case_id": i, "pararel_idx": i,
            "requested_rewrite": {"prompt": "The capital of {} is", "relation_id": "R1", "subject": s,
                                  "target_new": {"str": new, "id": "n"}, "target_true": {"str": true, "id": "t"}},
            "paraphrase_prompts": [f"{s}'s capital is", f"The capital city of {s} is"],
            "neighborhood_prompts": [f"The capital of {subjects[(i + 3) % len(subjects)]} is"],
            "attribute_prompts": [], "generation_prompts": [f"{s} is"],
        })
    return recs


def write_driver_assets(root) -> None:
    """A tiny GPT-2 + tokenizer saved with save_pretrained under root/model, 12 CounterFact records in root/cf.json
    and a small text in root/text.txt: what the driver tests run on (no world build)."""
    import json
    from pathlib import Path

    root = Path(root)
    tok = make_tokenizer()
    model = make_tiny_gpt2(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "cf.json").write_text(json.dumps(counterfact_records(12)))
    (root / "text.txt").write_text("\n".join(SENTENCES) + "\n")
