"""The editor contract, run over every registered editor: a new editor file is enrolled automatically."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from seqedit.apply import apply_added, apply_proposal, materialise, revert
from seqedit.builder import build_dataclass
from seqedit.editors.base import Editor, EditorContext, get_editor, list_editors
from seqedit.types import EditRequest

# Keep the contract suite fast: shrink iteration counts where an editor has such knobs.
FAST = {"value": {"num_grad_steps": 3}, "num_steps": 3, "stats": {"n_samples": 400},
        "context_template_length_params": [[3, 2]]}
# The MEMIT family draws one template per seed word: 5 of 3 tokens keep both key-average groups non-empty.
FAST_SPREAD = {"context_template_length_params": [[3, 5]]}


def requests() -> list[EditRequest]:
    return [
        EditRequest("c1", "The capital of {} is", "Varokel", "Quorath", "Mirandu",
                    paraphrase_prompts=("Varokel's capital is",), neighborhood_prompts=("The capital of Tesselin is",)),
        EditRequest("c2", "{} plays the sport of", "Danora Keltiss", "tennis", "hockey"),
    ]


def make(name: str, tmp_path, model, tokenizer, stats_text, seed: int = 0):
    cls = get_editor(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    fast = {**FAST, **(FAST_SPREAD if "context_template_prefixes" in fields else {})}
    options = {k: v for k, v in fast.items() if k in fields}
    editor = cls(build_dataclass(cls.Config, options))
    ctx = EditorContext.for_model(model, seed=seed, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                                  stats_text=(stats_text,))
    (tmp_path / "run").mkdir(exist_ok=True)
    editor.prepare(model, tokenizer, ctx)
    return editor


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_registry_lists_the_builtin_editors():
    names = list_editors()
    for expected in ("ft", "noop", "random"):
        assert expected in names


@pytest.mark.parametrize("name", list_editors())
def test_editor_contract(name, tiny_gpt2, tokenizer, stats_text, tmp_path):
    model = tiny_gpt2
    editor = make(name, tmp_path, model, tokenizer, stats_text)
    assert isinstance(editor, Editor)
    declared = editor.params(model)
    assert declared, "an editor must declare the parameters it may change"
    w0 = snapshot(model)

    proposal = editor.compute(model, tokenizer, requests())
    # compute() leaves the weights bitwise unchanged
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), f"{name}.compute modified {n}"
    assert set(proposal.deltas) <= set(declared)
    for key, value in proposal.stats.items():
        assert isinstance(key, str) and isinstance(value, float), (key, value)
    for n, (left, right) in proposal.factors.items():
        # factors are the ledger's form of the delta: they must reproduce it bit for bit
        assert torch.equal(materialise(left, right, proposal.deltas[n].dtype), proposal.deltas[n]), n

    applied = apply_proposal(model, proposal, declared)
    for n, p in model.named_parameters():
        if n in applied.deltas:
            assert torch.equal(p.detach() - w0[n], applied.deltas[n]), "applied delta must equal the parameter diff"
            torch.testing.assert_close(applied.deltas[n], proposal.deltas[n].float(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p, w0[n]), f"{name} changed undeclared parameter {n}"

    revert(model, applied)
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), "revert must restore the weights bit-identically"

    # deterministic under a seed: a fresh editor on the same model gives identical deltas
    again = make(name, tmp_path, model, tokenizer, stats_text).compute(model, tokenizer, requests())
    assert set(again.deltas) == set(proposal.deltas)
    for n in proposal.deltas:
        assert torch.equal(again.deltas[n], proposal.deltas[n]), f"{name} is not deterministic on {n}"

    # editor state round-trips through the snapshot format: after an applied call (and its `applied` hook), a fresh
    # editor prepared on the unedited model (as the driver does on resume) and loaded with the state computes the
    # same next deltas bit for bit
    applied = apply_proposal(model, proposal, declared)
    editor.applied(model, tokenizer, requests(), applied.added)
    buf = io.BytesIO()
    torch.save(editor.state_dict(), buf)
    buf.seek(0)
    nxt = [EditRequest("c3", "The capital of {} is", "Tesselin", "Quorath", "Varokel")]
    a = editor.compute(model, tokenizer, nxt)
    revert(model, applied)
    fresh = make(name, tmp_path, model, tokenizer, stats_text)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    again = apply_added(model, applied.added)
    b = fresh.compute(model, tokenizer, nxt)
    assert set(a.deltas) == set(b.deltas)
    for n in a.deltas:
        assert torch.equal(a.deltas[n], b.deltas[n]), f"{name}: state round-trip changed the next delta of {n}"
    revert(model, again)


def test_unknown_editor_did_you_mean():
    with pytest.raises(KeyError, match="Did you mean 'random'"):
        get_editor("randon")


def test_random_editor_norm_and_spikes(tiny_gpt2, tokenizer, tmp_path, stats_text):
    cls = get_editor("random")
    editor = cls(cls.Config(norm=2.0, spike_probability=1.0, spike_factor=10.0))
    editor.prepare(tiny_gpt2, tokenizer, EditorContext.for_model(tiny_gpt2, seed=3))
    prop = editor.compute(tiny_gpt2, tokenizer, requests()[:1])
    (delta,) = prop.deltas.values()
    assert torch.linalg.matrix_rank(delta).item() == 1
    assert delta.norm().item() == pytest.approx(20.0, rel=1e-5)
    assert prop.stats["random/spikes"] == 1.0
    with pytest.raises(ValueError, match="spike_probability"):
        cls.Config(spike_probability=2.0)


def test_ft_respects_linf_constraint(tiny_gpt2, tokenizer):
    cls = get_editor("ft")
    editor = cls(cls.Config(norm_constraint=1e-3, num_steps=5, lr=1e-2))
    editor.prepare(tiny_gpt2, tokenizer, EditorContext.for_model(tiny_gpt2))
    prop = editor.compute(tiny_gpt2, tokenizer, requests())
    (delta,) = prop.deltas.values()
    assert delta.abs().max().item() <= 1e-3 + 1e-7
    assert delta.abs().max().item() > 0
    assert prop.stats["ft/loss_last"] < prop.stats["ft/loss_first"]
