"""ROME / r-ROME / p-ROME: key equations, orientation, the ROME-vs-r-ROME difference, the editor contract details."""
from __future__ import annotations

import functools
import dataclasses
import json
from unittest import mock

import pytest
import torch

from seqedit.archs import arch_for, get_module, is_conv1d, linear_weight
from seqedit import tokens as tk
from seqedit.builder import build_dataclass
from seqedit.editors import _locate as core
from seqedit.editors.base import EditorContext, get_editor
from seqedit.hooks import capture
from seqedit.scoring import prompt_ids
from seqedit.types import EditRequest

from _rome_fixtures import make_model, make_tokenizer, prepared_editor, requests, write_text

FAST = dict(value={"num_grad_steps": 8, "weight_decay": 1e-3}, context_template_length_params=((4, 3),),
            stats={"n_samples": 300})


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("rome_text"))


editor_for = functools.partial(prepared_editor, fast=FAST)


def module_outputs_at_subject(model, tok, module_name, prompts, subject):
    """Output of `module_name` at the subject-last token, one prompt per forward pass (no batching)."""
    outs = []
    for p in prompts:
        idx = tk.subject_last_index(tok, p, subject)
        ids = torch.tensor([prompt_ids(tok, tk.fill(p, subject)[0])])
        with capture(model, [module_name], inputs=False) as cap:
            model(input_ids=ids)
        outs.append(cap.outputs[module_name][0, idx].double())
    return torch.stack(outs)  # [n, d_out]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------------------
# tokens


def test_subject_last_index_skips_bos_and_matches_slow_path(tok):
    ids = prompt_ids(tok, "The capital of Kalomi Ranvel is")
    assert ids[0] == tok.bos_token_id  # the fixture tokenizer prepends BOS
    for template, subject in [("The capital of {} is", "Kalomi Ranvel"), ("{} plays the sport of", "Quabri Stolen"),
                              ("x y. {}", "Tudor")]:
        idx = tk.subject_last_index(tok, template, subject)
        text = tk.fill(template, subject)[0]
        ids = prompt_ids(tok, text)
        # the subject's last token decodes to the end of the subject
        assert subject.endswith(tok.decode(ids[idx]).strip())
        assert len(prompt_ids(tok, text[: text.index(subject) + len(subject)])) - 1 == idx

        class Slow:  # same tokenizer through the non-fast fallback
            is_fast = False
            all_special_ids = tok.all_special_ids

            def __call__(self, *a, **k):
                return tok(*a, **k)

        assert tk.subject_last_index(Slow(), template, subject) == idx


def test_fill_rejects_templates_without_a_single_slot():
    with pytest.raises(ValueError, match="exactly once"):
        tk.fill("no slot here", "X")
    with pytest.raises(ValueError, match="empty subject"):
        tk.subject_last_index(make_tokenizer(), "{} is", "")


# ---------------------------------------------------------------------------------------------------------------
# context templates


def test_context_templates_seeded_persisted_and_reloaded(tok, tmp_path):
    model = make_model("gpt2", len(tok))
    params = ((4, 3), (6, 2))
    a = core.context_templates(model, tok, length_params=params, seed=5, run_dir=tmp_path)
    assert len(a) == 1 + 3 + 2 and a[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])
    stored = json.loads((tmp_path / core.DEFAULT_TEMPLATE_FILE).read_text())
    assert list(stored.values()) == [list(a)]
    # reloaded, not regenerated
    with mock.patch.object(core, "generate_context_templates", side_effect=AssertionError("regenerated")):
        assert core.context_templates(model, tok, length_params=params, seed=5, run_dir=tmp_path) == a
    # same seed reproduces without the file; another seed differs
    assert core.context_templates(model, tok, length_params=params, seed=5, run_dir=None) == a
    assert core.context_templates(model, tok, length_params=params, seed=6, run_dir=None) != a
    assert core._clean("a {b}\n c") == "a b c"


# ---------------------------------------------------------------------------------------------------------------
# key equations and orientation


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["rome", "r-rome", "p-rome"])
def test_edited_matrix_maps_the_update_key_to_v_star(kind, name, tok, text, tmp_path):
    model = make_model(kind, len(tok))
    editor = editor_for(name, model, tok, text, tmp_path, layers=(1,))
    arch = arch_for(model)
    request = requests()[0]
    (edit,) = editor.compute_edits(model, tok, [request])
    module = get_module(model, arch.mlp_out(1))
    assert edit.param == f"{arch.mlp_out(1)}.weight"
    assert edit.update.delta.shape == module.weight.shape
    assert is_conv1d(module) == (kind == "gpt2")
    torch.testing.assert_close(edit.update.left @ edit.update.right.T, edit.update.delta)

    templates = editor.templates(model, tok)
    prompts = core.contextualise(templates, request.prompt)
    with torch.no_grad():
        module.weight.add_(edit.update.delta)
    if name == "r-rome":  # W′k̄ + b = v*: the mean of the per-template outputs (linear in k)
        out = module_outputs_at_subject(model, tok, arch.mlp_out(1), prompts, request.subject).mean(0)
    else:  # W′k_raw + b = v* at the bare prompt
        out = module_outputs_at_subject(model, tok, arch.mlp_out(1), prompts[:1], request.subject)[0]
    assert rel_err(out, edit.value.target) <= 1e-4
    # the MLP output at the bare prompt is the value site: for ROME it now equals v* too
    if name != "r-rome":
        mlp_out = module_outputs_at_subject(model, tok, arch.mlp(1), prompts[:1], request.subject)[0]
        assert rel_err(mlp_out, edit.value.target) <= 1e-4


def test_rome_and_r_rome_differ_only_in_the_update_key(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    request = requests()[0]
    (rome,) = editor_for("rome", model, tok, text, tmp_path).compute_edits(model, tok, [request])
    (rr,) = editor_for("r-rome", model, tok, text, tmp_path).compute_edits(model, tok, [request])
    # same direction u (from the template mean k*), same v*
    torch.testing.assert_close(rome.update.u, rr.update.u, rtol=1e-6, atol=1e-9)
    assert torch.equal(rome.value.target, rr.value.target)
    torch.testing.assert_close(rome.key_for_u, rr.key_for_u)
    # ... but ROME divides by the bare-prompt key, r-ROME by the template mean
    torch.testing.assert_close(rome.key_for_update, rome.keys[0].float())
    torch.testing.assert_close(rr.key_for_update, rr.keys.float().mean(0))
    assert not torch.allclose(rome.key_for_update, rr.key_for_update)
    assert not torch.allclose(rome.update.delta, rr.update.delta)
    den_rome = float(rome.key_for_update.double() @ rome.update.u)
    assert rome.update.stats["denominator"] == pytest.approx(den_rome, rel=1e-6)


def test_all_variants_agree_without_context_prefixes(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    request = requests()[1]
    deltas = {}
    for name in ("rome", "r-rome", "p-rome"):
        editor = editor_for(name, model, tok, text, tmp_path, context_templates=("{}",))
        deltas[name] = editor.compute(model, tok, [request]).deltas
    (param,) = deltas["rome"]
    assert torch.equal(deltas["rome"][param], deltas["r-rome"][param])
    assert torch.equal(deltas["rome"][param], deltas["p-rome"][param])


def test_without_mom2_adjustment_u_is_the_normalised_key(tok, text, tmp_path):
    model = make_model("llama", len(tok))
    editor = editor_for("rome", model, tok, text, tmp_path, mom2_adjustment=False)
    (edit,) = editor.compute_edits(model, tok, requests()[:1])
    k = edit.keys.double().mean(0)
    torch.testing.assert_close(edit.update.u, k / k.norm())
    assert editor.moments == {}  # no statistics were needed


def test_mom2_adjustment_uses_the_inverse_second_moment(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    editor = editor_for("rome", model, tok, text, tmp_path, layers=(0,))
    (edit,) = editor.compute_edits(model, tok, requests()[:1])
    c = editor.moments[0].mom2.double()
    # C u ∝ k*
    cu = c @ edit.update.u
    k = edit.key_for_u.double()
    assert float(torch.nn.functional.cosine_similarity(cu, k, dim=0)) > 1 - 1e-8


# ---------------------------------------------------------------------------------------------------------------
# contract details


def test_compute_restores_weights_flags_and_mode_and_is_deterministic(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    model.train()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = editor_for("rome", model, tok, text, tmp_path, seed=3)
    prop = editor.compute(model, tok, requests())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
    assert model.training
    assert set(prop.deltas) == set(editor.params(model))
    for n, (left, right) in prop.factors.items():
        assert left.shape[1] == right.shape[1] == 2  # one rank-one term per request
        torch.testing.assert_close(left @ right.T, prop.deltas[n], rtol=1e-5, atol=1e-7)
    # a fresh editor with the same seed but no saved templates reproduces the deltas bit for bit
    other = get_editor("rome")(build_dataclass(get_editor("rome").Config, FAST))
    other.prepare(model, tok, EditorContext.for_model(model, seed=3, cache_dir=tmp_path / "cache", stats_text=(text,)))
    again = other.compute(model, tok, requests())
    for n in prop.deltas:
        assert torch.equal(again.deltas[n], prop.deltas[n])


def test_several_requests_are_applied_one_after_another(tok, text, tmp_path):
    model = make_model("llama", len(tok))
    editor = editor_for("r-rome", model, tok, text, tmp_path, layers=(1,))
    arch = arch_for(model)
    r1, r2 = requests()
    e1, e2 = editor.compute_edits(model, tok, [r1, r2])
    prop = editor.compute(model, tok, [r1, r2])
    (param,) = prop.deltas
    torch.testing.assert_close(prop.deltas[param], e1.update.delta + e2.update.delta)
    # the second edit was computed on W + Δ1: with both applied, request 2's key equation holds exactly
    (alone,) = editor.compute_edits(model, tok, [r2])
    assert not torch.allclose(alone.update.delta, e2.update.delta)
    with torch.no_grad():
        model.get_parameter(param).add_(prop.deltas[param])
    prompts = core.contextualise(editor.templates(model, tok), r2.prompt)
    out = module_outputs_at_subject(model, tok, arch.mlp_out(1), prompts, r2.subject).mean(0)
    assert rel_err(out, e2.value.target) <= 1e-4


def test_stats_are_the_documented_floats(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    editor = editor_for("rome", model, tok, text, tmp_path)
    prop = editor.compute(model, tok, requests()[:1])
    (edit,) = editor.compute_edits(model, tok, requests()[:1])
    expected = {"rome/denominator", "rome/u_norm", "rome/right_norm", "rome/residual_norm", "rome/key_norm",
                "rome/key_cos", "rome/update_fro", "rome/update_rel", "rome/delta_norm", "rome/v_loss", "rome/v_nll",
                "rome/v_kl", "rome/v_steps", "rome/ridge", "rome/condition", "rome/n_requests", "rome/seconds_keys",
                "rome/seconds_v", "rome/seconds_update"}
    assert set(prop.stats) == expected
    assert all(isinstance(v, float) for v in prop.stats.values())
    assert prop.stats["rome/denominator"] == pytest.approx(edit.update.stats["denominator"], rel=1e-6)
    (delta,) = prop.deltas.values()
    assert prop.stats["rome/update_fro"] == pytest.approx(float(delta.double().norm()), rel=1e-5)
    assert prop.stats["rome/right_norm"] == pytest.approx(float(edit.update.right_vector.norm()), rel=1e-6)
    assert prop.stats["rome/v_loss"] == pytest.approx(edit.value.losses[-1], rel=1e-6)
    assert 0 <= prop.stats["rome/v_steps"] <= FAST["value"]["num_grad_steps"] - 1


# ---------------------------------------------------------------------------------------------------------------
# v* optimisation


def test_value_optimisation_lowers_the_target_nll_and_respects_the_clamp(tok):
    model = make_model("gpt2", len(tok))
    arch = arch_for(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a random model is nearly flat: small steps without decay still lower the loss monotonically
    cfg = core.ValueConfig(num_grad_steps=6, lr=0.05, weight_decay=0.0, clamp_norm_factor=100.0)
    templates = ("{}", "Ka lo. {}")
    res = core.optimise_value(model, tok, arch, requests()[0], arch.mlp(1), templates, cfg)
    assert all(b < a for a, b in zip(res.losses, res.losses[1:]))
    assert res.n_updates == len(res.losses) - 1 == 5
    torch.testing.assert_close(res.target, res.init + res.delta)
    clamped = core.optimise_value(model, tok, arch, requests()[0], arch.mlp(1), templates,
                                  dataclasses.replace(cfg, lr=0.5, clamp_norm_factor=0.5))
    assert float(clamped.delta.norm()) <= 0.5 * float(clamped.init.norm()) * (1 + 1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None
    # v0 is the MLP output at the bare prompt's subject-last token
    v0 = module_outputs_at_subject(model, tok, arch.mlp(1), ["The capital of {} is"], "Kalomi Ranvel")[0]
    assert rel_err(v0, res.init) < 1e-5
    # early stop: a loss threshold above the first loss ends after one evaluation
    quick = core.optimise_value(model, tok, arch, requests()[0], arch.mlp(1), templates,
                                dataclasses.replace(cfg, early_stop_loss=1e9))
    assert quick.n_updates == 0 and len(quick.losses) == 1


def test_templates_must_start_with_the_bare_prompt():
    with pytest.raises(ValueError, match="bare template"):
        get_editor("rome").Config(context_templates=("x. {}",))


def test_request_prompt_with_subject_at_the_end(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    req = EditRequest("r3", "Everyone knows {}", "Kalomi Ranvel", "Zorpha")
    prop = editor_for("r-rome", model, tok, text, tmp_path).compute(model, tok, [req])
    assert all(torch.isfinite(d).all() for d in prop.deltas.values())


# ---------------------------------------------------------------------------------------------------------------
# efficacy on a trained world model (slow; needs seqedit.world)


@pytest.mark.slow
def test_r_rome_single_edits_on_the_world_model(tmp_path):
    """100 independent single r-ROME edits: efficacy >= 0.9, paraphrase above the unedited model, neighbours kept.

    40 v* steps instead of the published 20: on world:small (format 4) 20 steps reach efficacy 0.86, 40 reach 0.95
    (paraphrase 0.94, neighbourhood 0.991; bench/world_gates.py), at a median ||dW||/||W0|| of 0.19 instead of 0.16.

    The preset comes from $SEQEDIT_ROME_WORLD (default "small", the world of `seqedit run`); it is built on first use
    (about 6.5 minutes for small on 2 cores)."""
    import os

    from seqedit.apply import apply_proposal, revert
    from seqedit.data import load_requests
    from seqedit.metrics import evaluate_requests, mean_of

    world_pkg = pytest.importorskip("seqedit.world")
    if not hasattr(world_pkg, "load_world"):
        pytest.skip("seqedit.world.load_world is not available yet")
    torch.set_num_threads(2)
    w = world_pkg.load_world(os.environ.get("SEQEDIT_ROME_WORLD", "small"))
    model, tok = w.model, w.tokenizer
    reqs = list(load_requests(w.counterfact_path).requests)[:100]
    base = evaluate_requests(model, tok, reqs)
    editor = get_editor("r-rome")(build_dataclass(get_editor("r-rome").Config, {"layers": [0], "value": {"num_grad_steps": 40}}))
    editor.prepare(model, tok, EditorContext.for_model(model, seed=0, run_dir=tmp_path, cache_dir=tmp_path / "cache",
                                                       stats_text=(w.heldout_path,)))
    outcomes = []
    for r in reqs:
        applied = apply_proposal(model, editor.compute(model, tok, [r]), editor.params(model))
        outcomes.extend(evaluate_requests(model, tok, [r]))
        revert(model, applied)
    eff, para, nbr = (mean_of(outcomes, k) for k in ("efficacy", "paraphrase", "neighborhood"))
    base_para, base_nbr = mean_of(base, "paraphrase"), mean_of(base, "neighborhood")
    print(f"r-ROME on world: efficacy {eff:.3f}, paraphrase {para:.3f} (unedited {base_para:.3f}), "
          f"neighbourhood {nbr:.3f} (unedited {base_nbr:.3f})")
    assert eff >= 0.9
    assert para > base_para
    assert nbr >= base_nbr - 0.1


def test_explicit_last_loss_layer_recomputes_the_model_logits(tok):
    model = make_model("llama", len(tok))
    arch = arch_for(model)
    cfg = core.ValueConfig(num_grad_steps=4, lr=0.05, weight_decay=0.0)
    own = core.optimise_value(model, tok, arch, requests()[0], arch.mlp(0), ("{}",), cfg)
    via = core.optimise_value(model, tok, arch, requests()[0], arch.mlp(0), ("{}",),
                              dataclasses.replace(cfg, loss_layer=2))
    torch.testing.assert_close(via.target, own.target, rtol=1e-4, atol=1e-6)
    assert via.losses == pytest.approx(own.losses, rel=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        core.optimise_value(model, tok, arch, requests()[0], arch.mlp(0), ("{}",),
                            dataclasses.replace(cfg, loss_layer=3))


def test_two_layers_are_edited_one_after_the_other(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    arch = arch_for(model)
    editor = editor_for("rome", model, tok, text, tmp_path, layers=(2, 0))
    e0, e2 = editor.compute_edits(model, tok, requests()[:1])
    assert (e0.layer, e2.layer) == (0, 2)
    prop = editor.compute(model, tok, requests()[:1])
    assert set(prop.deltas) == {f"{arch.mlp_out(0)}.weight", f"{arch.mlp_out(2)}.weight"} == set(editor.params(model))
    # layer 2's keys were taken with layer 0 already edited
    with torch.no_grad():
        model.get_parameter(e0.param).add_(e0.update.delta)
    keys_after = core.subject_keys(model, tok, arch.mlp_out(2), ["The capital of {} is"], ["Kalomi Ranvel"])
    torch.testing.assert_close(keys_after[0].float(), e2.keys[0].float(), rtol=1e-5, atol=1e-6)


def test_bfloat16_model_gives_finite_float32_deltas(tok, text, tmp_path):
    model = make_model("llama", len(tok)).to(torch.bfloat16)
    prop = editor_for("r-rome", model, tok, text, tmp_path).compute(model, tok, requests()[:1])
    (delta,) = prop.deltas.values()
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all() and delta.abs().max() > 0
