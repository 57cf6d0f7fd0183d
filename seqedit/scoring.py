"""Batched teacher-forced scoring of target continuations: the one place that turns (prompt, target) pairs into
log-probabilities. Used by the driver's immediate check, probes and editor tests.

Convention: prompt ids come from `tokenizer(prompt)` (so a tokenizer that adds BOS adds it here too) and target ids
from `tokenizer(" " + target, add_special_tokens=False)`; tokenising the two separately keeps BPE merges from
crossing the boundary. Sequences are right-padded and scored with an attention mask, so batched results equal
one-at-a-time results.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TargetScore:
    logprob: float  # sum over target tokens of log p(token | prefix)
    n_tokens: int
    exact: bool  # every target token is the argmax (teacher-forced): CounterFact's *_acc criterion

    @property
    def nll(self) -> float:  # mean per-token negative log-likelihood, CounterFact's NLL
        return -self.logprob / self.n_tokens

    @property
    def prob(self) -> float:  # exp(-NLL), the per-token-mean probability
        return float(torch.exp(torch.tensor(-self.nll)))


def pad_batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (ids, attention_mask), both [batch, max_len] long tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def target_ids(tokenizer: Any, target: str) -> list[int]:
    ids = tokenizer(" " + target.lstrip(" "), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
) -> list[TargetScore]:
    """Score each `targets[i]` as a continuation of `prompts[i]`."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # One batched tokenizer call per side (fast tokenizers encode lists in Rust); same ids as prompt_ids/target_ids.
    p_ids = tokenizer(list(prompts))["input_ids"] if prompts else []
    t_ids = tokenizer([" " + t.lstrip(" ") for t in targets], add_special_tokens=False)["input_ids"] if targets else []
    for t, ids in zip(targets, t_ids):
        if not ids:
            raise ValueError(f"target {t!r} tokenises to nothing")
    encoded = [(list(p), list(t)) for p, t in zip(p_ids, t_ids)]
    # Batches of similar lengths: less padding per forward pass (results go back to the caller's order).
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    scored: list[TargetScore] = []
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        ids, mask = pad_batch([p + t for p, t in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [b, pos, vocab]
        # Only the positions that predict a target token: one flat gather for the whole batch.
        rows = [i for i, (_, t) in enumerate(chunk) for _ in t]
        cols = [len(p) - 1 + j for p, t in chunk for j in range(len(t))]
        tgt = torch.tensor([tok for _, t in chunk for tok in t], device=device)  # [n_target_tokens]
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()  # [n, vocab]
        logp = torch.log_softmax(picked, dim=-1)
        lp = logp.gather(1, tgt[:, None])[:, 0].tolist()
        hit = (logp.argmax(-1) == tgt).tolist()
        k = 0
        for _, t in chunk:
            n = len(t)
            scored.append(TargetScore(float(sum(lp[k : k + n])), n, all(hit[k : k + n])))
            k += n
    back = sorted(range(len(order)), key=order.__getitem__)  # inverse permutation: caller's index -> scored index
    return [scored[j] for j in back]

