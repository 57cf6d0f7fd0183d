"""CounterFact-style scores of edit requests on the live model, batched across requests.

Efficacy: P(new) > P(true) on the edit prompt (mean per-token NLL comparison, as CounterFact's ES). Without a
`target_true` (zsRE-style data) efficacy is the teacher-forced exact match of the new target. Paraphrase: the same
over paraphrase prompts. Neighbourhood: the expected answer still beats `target_new` on neighbour prompts (or, with
per-prompt answers, is still produced exactly).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from seqedit.scoring import score_targets
from seqedit.types import EditOutcome, EditRequest


def evaluate_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    paraphrase: bool = True,
    neighborhood: bool = True,
    batch_size: int = 64,
) -> list[EditOutcome]:
    prompts: list[str] = []
    targets: list[str] = []
    plan: list[dict[str, Any]] = []  # per request: where its scores live in the flat list

    def add(prompt: str, target: str) -> int:
        prompts.append(prompt)
        targets.append(target)
        return len(prompts) - 1

    for r in requests:
        entry: dict[str, Any] = {"new": add(r.text, r.target_new)}
        entry["true"] = add(r.text, r.target_true) if r.target_true is not None else None
        entry["para"] = []
        if paraphrase:
            for p in r.paraphrase_prompts:
                entry["para"].append((add(p, r.target_new), add(p, r.target_true) if r.target_true else None))
        entry["nbr"] = []
        if neighborhood:
            for p, answer in r.neighbours():
                entry["nbr"].append((add(p, answer), add(p, r.target_new) if not r.neighborhood_targets else None))
        plan.append(entry)

    scores = score_targets(model, tokenizer, prompts, targets, batch_size=batch_size)

    def beats(i: int, j: int | None) -> float:
        if j is None:
            return float(scores[i].exact)
        return float(scores[i].nll < scores[j].nll)

    outcomes = []
    for r, e in zip(requests, plan):
        para = [beats(i, j) for i, j in e["para"]]
        nbr = [beats(i, j) for i, j in e["nbr"]]
        outcomes.append(
            EditOutcome(
                case_id=r.case_id,
                efficacy=beats(e["new"], e["true"]),
                prob_new=scores[e["new"]].prob,
                prob_true=scores[e["true"]].prob if e["true"] is not None else None,
                paraphrase=sum(para) / len(para) if para else None,
                neighborhood=sum(nbr) / len(nbr) if nbr else None,
            )
        )
    return outcomes


def mean_of(outcomes: Sequence[EditOutcome], field: str) -> float | None:
    values = [getattr(o, field) for o in outcomes if getattr(o, field) is not None]
    return sum(values) / len(values) if values else None
