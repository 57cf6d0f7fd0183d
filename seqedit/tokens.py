"""Token helpers shared by the editors, `seqedit trace` and the benchmarks.

- `fill`: put a subject into a prompt template's single "{}".
- `subject_last_index` / `subject_token_span`: where the subject's tokens are in `prompt_ids(tokenizer, text)`
  (BOS-aware; valid with right padding, which is what `right_pad` gives).
- `right_pad`, `pad_id`: right-padded id batches on a device.
Conventions follow `seqedit.scoring`: prompt ids = `tokenizer(prompt)` (a BOS-adding tokenizer adds BOS), target ids =
`tokenizer(" " + target, add_special_tokens=False)`; the two are concatenated as ids, never re-tokenised as one string.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from seqedit.scoring import pad_batch, prompt_ids


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """Put `subject` into the single "{}" of `template`; returns (text, subject char start, subject char end)."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain '{{}}' exactly once, got {template!r}")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2 :], start, start + len(subject)


def _leading_specials(ids: Sequence[int], tokenizer: Any) -> int:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def subject_last_index(tokenizer: Any, template: str, subject: str) -> int:
    """Index of the subject's last token in `prompt_ids(tokenizer, fill(template, subject)[0])`.

    Fast tokenizers: the last token whose character span overlaps the subject (special tokens such as a prepended
    BOS have empty spans and never match). Others: leading special tokens + tokens of the text up to the subject end.
    """
    text, start, end = fill(template, subject)
    if end == start:
        raise ValueError(f"empty subject for prompt {template!r}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
        if not hits:
            raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
        return hits[-1]
    ids = prompt_ids(tokenizer, text)
    n = _leading_specials(ids, tokenizer) + len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
    if not 0 < n <= len(ids):
        raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
    return n - 1


def subject_token_span(tokenizer: Any, template: str, subject: str) -> tuple[int, int]:
    """[first, last + 1) token indices of the subject in `prompt_ids(tokenizer, fill(template, subject)[0])`.

    The end is `subject_last_index` + 1. Fast tokenizers: the first token whose character span overlaps the subject.
    Others: leading special tokens + tokens of the text before the subject, with its trailing space if those tokens
    begin the prompt's tokens, else without it (BPE and SentencePiece usually glue the space to the next word).
    """
    last = subject_last_index(tokenizer, template, subject)
    text, start, end = fill(template, subject)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        first = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a)
    else:
        ids = prompt_ids(tokenizer, text)
        n_special = _leading_specials(ids, tokenizer)
        n_prefix = 0
        for prefix in (text[:start], text[:start].rstrip(" ")):
            pre = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            if list(ids[n_special : n_special + len(pre)]) == list(pre):
                n_prefix = len(pre)
                break
        else:
            n_prefix = len(tokenizer(text[:start].rstrip(" "), add_special_tokens=False)["input_ids"])
        first = min(n_special + n_prefix, last)
    return first, last + 1


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both [len(rows), max_len] long tensors on `device`."""
    ids, mask = pad_batch(rows, pad_id)
    return ids.to(device), mask.to(device)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
