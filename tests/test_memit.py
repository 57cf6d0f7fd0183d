"""MEMIT, EMMET, AlphaEdit, ENCORE: the published math on tiny models (GPT-2 Conv1D and Llama Linear), the solver
choices on singular systems, the state their caches carry, and ENCORE's early stopping."""
from __future__ import annotations

import functools
import copy
import dataclasses
import io

import pytest
import torch

from seqedit.apply import apply_proposal, revert
from seqedit.archs import arch_for, get_module, linear_weight
from seqedit.builder import ConfigError, build_dataclass
from seqedit.editors import _locate as lc
from seqedit.editors.base import EditorContext, get_editor, make_editor
from seqedit.types import EditRequest

from _rome_fixtures import make_model, make_tokenizer, prepared_editor, requests, write_text
from _world_fixtures import tiny_world  # noqa: F401  (fixture)
from seqedit.data import load_requests

FAST = {"value": {"num_grad_steps": 6}, "context_template_length_params": [[3, 5]], "stats": {"n_samples": 300}}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("memit_text"))


editor_for = functools.partial(prepared_editor, fast=FAST)


def more_requests() -> list[EditRequest]:
    return [EditRequest("m1", "{} works for", "Kalomi Ranvel", "Tustovel", "Brilen"),
            EditRequest("m2", "{} was born in", "Vel Doran", "Quatu", "Phaish")]


def linear_delta(module, delta: torch.Tensor) -> torch.Tensor:
    """Stored-layout delta in the Linear convention [d_out, d_in]."""
    return delta.T if linear_weight(module).shape != delta.shape else delta


# -- published defaults and config ---------------------------------------------------------------------------------

def test_published_defaults():
    memit, emmet, alpha, encore = (get_editor(n).Config() for n in ("memit", "emmet", "alphaedit", "encore"))
    for cfg in (memit, emmet, alpha, encore):
        assert cfg.value.clamp_norm_factor == 0.75 and cfg.value.num_grad_steps == 20 and cfg.value.lr == 0.5
        assert cfg.context_template_length_params == ((10, 5),) and cfg.context_template_prefixes == lc.MEMIT_PREFIXES
        assert cfg.key_average == "groups" and cfg.ridge == 0.0 and cfg.stats.dtype == "float32"
        assert cfg.value.loss_layer is None  # the model's own logits = MEMIT's ln_f + lm_head on the last block
    assert (memit.mom2_update_weight, memit.solver, memit.solve_dtype) == (20000.0, "solve", "float64")
    assert (emmet.emmet_lambda, emmet.update_norm_lambda, emmet.solver) == (0.1, 0.0, "inverse")
    assert (alpha.nullspace_threshold, alpha.L2, alpha.solve_dtype) == (2e-2, 10.0, "float32")
    assert (encore.update_norm_lambda, encore.value.prob_cutoff, encore.add_prev_edits) == (10.0, -4, True)
    assert memit.value.prob_cutoff == 0
    rome = get_editor("rome").Config()
    assert (rome.solver, rome.ridge, rome.stats.dtype, rome.value.loss_layer) == ("inverse", 0.0, "float32", None)


def test_config_errors_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match="solver 'inverse' is not allowed; allowed: solve, cholesky, lstsq"):
        make_editor("memit", {"solver": "inverse"})
    with pytest.raises(ConfigError, match="allowed: solve, lstsq"):
        make_editor("alphaedit", {"solver": "cholesky"})
    with pytest.raises(ConfigError, match="'editor.v_lr' was renamed to 'editor.value.lr'"):
        build_dataclass(get_editor("rome").Config, {"v_lr": 0.1}, where="editor")
    with pytest.raises(ConfigError, match="unknown config key 'editor.value.lrr'.*lr"):
        build_dataclass(get_editor("memit").Config, {"value": {"lrr": 0.1}}, where="editor")
    with pytest.raises(ConfigError, match="repeat"):
        make_editor("memit", {"layers": [1, 1]})
    model = make_model("gpt2", 320)  # 3 layers
    with pytest.raises(ValueError, match="last block"):
        make_editor("memit", {"layers": [1, 2]}).layers(model)


# -- MEMIT --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_memit_one_layer_tiny_lambda_is_the_exact_least_squares_fit(kind, tok, text, tmp_path):
    """λ → 0: Δ = R Kᵀ(λC + KKᵀ)⁻¹ fits every key exactly (ΔW k_i = r_i) and equals the formula computed here."""
    model = make_model(kind, len(tok))
    editor = editor_for("memit", model, tok, text, tmp_path, layers=[1], mom2_update_weight=1e-6)
    reqs = requests()[:2] + more_requests()
    _, (step,), _ = editor.compute_steps(model, tok, reqs)
    module = get_module(model, arch_for(model).mlp_out(1))
    dw = linear_delta(module, step.delta).double()  # [d_out, d_in]
    k, r = step.keys.double().T, step.resid.double().T  # [d_in, n], [d_out, n]
    torch.testing.assert_close(dw @ k, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    c = editor.moments[1].mom2.double()
    ref = r @ k.T @ torch.linalg.inv(1e-6 * c + k @ k.T)
    assert float(torch.nn.functional.cosine_similarity(ref.flatten(), dw.flatten(), dim=0)) > 1 - 1e-8


def test_memit_spreads_the_residual_over_the_layers_in_order(tok, text, tmp_path):
    """Two layers: the first takes half of z − h_L, the second what is left after the first was applied, and
    together they bring h_L at the bare prompts to z better than the first alone."""
    model = make_model("gpt2", len(tok))
    editor = editor_for("memit", model, tok, text, tmp_path, layers=[0, 1], mom2_update_weight=1.0)
    reqs = requests()[:2]
    values, steps, _ = editor.compute_steps(model, tok, reqs)
    assert [s.layer for s in steps] == [0, 1]
    zs = torch.stack([v.target for v in values])
    top = arch_for(model).layer(1)
    h0 = lc.subject_outputs(model, tok, top, reqs)
    torch.testing.assert_close(steps[0].resid, (zs - h0) / 2)
    prop = editor.compute(model, tok, reqs)
    applied = apply_proposal(model, prop, editor.params(model))
    h1 = lc.subject_outputs(model, tok, top, reqs)
    revert(model, applied)
    assert float((zs - h1).norm()) < 0.5 * float((zs - h0).norm())
    for s in steps:  # documented per-layer diagnostics
        for key in ("residual_norm", "update_fro", "update_rel", "condition", "z_error", "key_norm"):
            assert f"memit/l{s.layer}/{key}" in prop.stats


def test_memit_keys_average_the_bare_prompt_and_the_prefixes_as_two_groups(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    editor = editor_for("memit", model, tok, text, tmp_path, layers=[1])
    templates = editor.templates(model, tok)
    assert len(templates) == 6 and all(t.startswith(w) for t, w in zip(templates[1:], lc.MEMIT_PREFIXES))
    r = requests()[0]
    module = arch_for(model).mlp_out(1)
    per = lc.subject_keys(model, tok, module, lc.contextualise(templates, r.prompt), [r.subject] * 6).float()
    got = editor.request_keys(model, tok, 1, [r])[0]
    torch.testing.assert_close(got, 0.5 * per[0] + 0.5 * per[1:].mean(0))  # weights 1/2 and 1/10 each


# -- EMMET --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_emmet_batch_of_one_is_r_rome_on_the_same_key_and_value(kind, tok, text, tmp_path):
    """n = 1 (no emmet_lambda): Δ = r (C⁻¹k)ᵀ/(kᵀC⁻¹k), r-ROME's update with consistent keys. Same key k̄ and
    residual: the deltas agree to 1e-8 relative (both solved in float64)."""
    model = make_model(kind, len(tok))
    rr = prepared_editor("r-rome", model, tok, text, tmp_path / "rr", layers=[1], solver="cholesky",
                         fast={**FAST, "context_template_length_params": [[3, 4]]})
    (edit,) = rr.compute_edits(model, tok, requests()[:1])
    emmet = editor_for("emmet", model, tok, text, tmp_path, layers=[1])
    k = edit.key_for_update.float()[None]  # [1, d_in]: the template mean, as r-ROME uses for u and the update
    adj, diag = emmet.layer_adjustment(model, tok, 0, 1, k)
    module = get_module(model, arch_for(model).mlp_out(1))
    resid = edit.update.right_vector * float(k[0].double() @ edit.update.u)  # v* − W k̄ − b
    delta, _, _ = lc.low_rank_factors(module, resid[None], adj)
    a, b = delta.double().flatten(), edit.update.delta.double().flatten()
    assert float((a - b).norm() / b.norm()) < 1e-6  # float32 factors bound the agreement
    assert diag["pseudo_inverse"] == 0.0


def test_emmet_d_fallback_is_the_published_pseudo_inverse(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    emmet = editor_for("emmet", model, tok, text, tmp_path, layers=[1], emmet_lambda=0.0)
    k = emmet.request_keys(model, tok, 1, requests()[:1])
    adj, diag = emmet.layer_adjustment(model, tok, 0, 1, torch.cat([k, k]))  # two identical keys: D singular
    assert diag["pseudo_inverse"] == 1.0 and torch.isfinite(adj).all()


# -- AlphaEdit ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_alphaedit_leaves_preserved_keys_untouched(kind, tok, text, tmp_path):
    """Keys in the span of C's large singular directions (P k0 = 0) keep their outputs exactly: ΔW k0 ≈ 0."""
    model = make_model(kind, len(tok))
    memit = editor_for("memit", model, tok, text, tmp_path, layers=[1])
    c = memit.moments[1].mom2.float()
    u, s, _ = torch.linalg.svd(c)
    thr = float(s.median())  # tiny random models have no natural scale: half the directions preserved
    editor = editor_for("alphaedit", model, tok, text, tmp_path, layers=[1], nullspace_threshold=thr)
    keep = u[:, s >= thr]
    assert 0 < keep.shape[1] < c.shape[0] and editor.null_dim[1] == c.shape[0] - keep.shape[1]
    p = editor.projectors[1]
    k0 = keep @ torch.randn(keep.shape[1], 20, generator=torch.Generator().manual_seed(0))  # [d_in, 20]
    assert float((p @ k0).norm() / k0.norm()) < 1e-5
    prop = editor.compute(model, tok, requests()[:2])
    module = get_module(model, arch_for(model).mlp_out(1))
    dw = linear_delta(module, next(iter(prop.deltas.values()))).double()
    assert float(dw.norm()) > 0
    assert float((dw @ k0.double()).norm()) < 1e-4 * float(dw.norm()) * float(k0.norm())
    dm = linear_delta(module, next(iter(memit.compute(model, tok, requests()[:2]).deltas.values()))).double()
    assert float((dm @ k0.double()).norm()) > 1e3 * float((dw @ k0.double()).norm())  # MEMIT does move them


def test_alphaedit_cache_grows_round_trips_and_changes_the_next_delta(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    editor = editor_for("alphaedit", model, tok, text, tmp_path, layers=[1])
    first = requests()[:2]
    prop = editor.compute(model, tok, first)
    assert editor.key_cache == {}  # compute leaves the state alone
    applied = apply_proposal(model, prop, editor.params(model))
    editor.applied(model, tok, first, applied.added)
    k = editor.request_keys(model, tok, 1, first).T  # keys on the edited model, as the original recomputes them
    torch.testing.assert_close(editor.key_cache[1], k @ k.T)
    assert editor.key_count == {1: 2}
    buf = io.BytesIO()
    torch.save(editor.state_dict(), buf)
    buf.seek(0)
    fresh = editor_for("alphaedit", model, tok, text, tmp_path, layers=[1])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    nxt = more_requests()
    a, b = editor.compute(model, tok, nxt), fresh.compute(model, tok, nxt)
    (name,) = a.deltas
    assert torch.equal(a.deltas[name], b.deltas[name])
    blank = editor_for("alphaedit", model, tok, text, tmp_path, layers=[1])
    c = blank.compute(model, tok, nxt)
    assert not torch.allclose(c.deltas[name], a.deltas[name])  # the cache of earlier keys matters
    revert(model, applied)


# -- ENCORE -------------------------------------------------------------------------------------------------------

def test_encore_mpes_stops_once_the_target_is_the_argmax(tiny_world):
    """On a trained world (a random tiny model cannot make a target the argmax): MPES ends the z optimisation
    after the first step at which every target position of the prefixed prompts predicts the target, on the same
    trajectory as the full run; the probability rule stops once the mean target probability passes the cutoff."""
    model, tok = copy.deepcopy(tiny_world.model), tiny_world.tokenizer
    arch = arch_for(model)
    req = load_requests(tiny_world.counterfact_path).requests[0]
    templates = ("{}", "The. {}", "Because. {}")
    base = lc.ValueConfig(num_grad_steps=25, clamp_norm_factor=4.0, early_stop_loss=0.0)
    full = lc.optimise_value(model, tok, arch, req, arch.layer(0), templates, base)
    mpes = lc.optimise_value(model, tok, arch, req, arch.layer(0), templates,
                             dataclasses.replace(base, prob_cutoff=-1))
    assert full.stopped_by == "steps" and mpes.stopped_by == "mpes"
    assert mpes.n_updates < full.n_updates
    assert mpes.losses == full.losses[: len(mpes.losses)]  # same trajectory up to the stop
    twice = lc.optimise_value(model, tok, arch, req, arch.layer(0), templates,
                              dataclasses.replace(base, prob_cutoff=-2))
    assert mpes.n_updates < twice.n_updates <= full.n_updates
    prob = lc.optimise_value(model, tok, arch, req, arch.layer(0), templates,
                             dataclasses.replace(base, prob_cutoff=0.5))
    assert prob.stopped_by == "mpes" and prob.n_updates < full.n_updates
    with pytest.raises(ValueError, match="whole number"):
        lc.ValueConfig(prob_cutoff=-1.5)


def test_batched_z_optimisation_follows_each_request_alone(tiny_world):
    """optimise_values over several requests = optimise_value per request (float rounding apart), including
    requests that stop early while others go on."""
    model, tok = copy.deepcopy(tiny_world.model), tiny_world.tokenizer
    arch = arch_for(model)
    reqs = list(load_requests(tiny_world.counterfact_path).requests[:6])
    templates = ("{}", "The. {}", "Because. {}")
    cfg = lc.ValueConfig(num_grad_steps=12, clamp_norm_factor=4.0, prob_cutoff=-2)
    together = lc.optimise_values(model, tok, arch, reqs, arch.layer(0), templates, cfg)
    editor = make_editor("memit", {"layers": [0], "context_templates": list(templates),
                                   "value": {**cfg.__dict__, "batch_requests": 4}})  # chunks of 4 + 2
    editor.prepare(model, tok, EditorContext.for_model(model, cache_dir=None, stats_text=(tiny_world.heldout_path,)))
    chunked, _, _ = editor.compute_steps(model, tok, reqs)
    alone = [lc.optimise_value(model, tok, arch, r, arch.layer(0), templates, cfg) for r in reqs]
    assert len({r.n_updates for r in alone}) > 1, "the requests should stop at different steps"
    for c, a in zip(chunked, together):
        torch.testing.assert_close(c.target, a.target, rtol=1e-4, atol=1e-5)
    for a, b in zip(together, alone):
        assert (a.n_updates, a.stopped_by, len(a.losses)) == (b.n_updates, b.stopped_by, len(b.losses))
        torch.testing.assert_close(a.target, b.target, rtol=1e-4, atol=1e-5)
        assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-5)


def test_encore_preserves_earlier_keys_and_penalises_the_norm(tok, text, tmp_path):
    model = make_model("gpt2", len(tok))
    encore = editor_for("encore", model, tok, text, tmp_path, layers=[1])
    first = requests()[:2]
    applied = apply_proposal(model, encore.compute(model, tok, first), encore.params(model))
    encore.applied(model, tok, first, applied.added)
    k = encore.request_keys(model, tok, 1, first).T.double()
    torch.testing.assert_close(encore.key_cache[1], k @ k.T)
    kn = encore.request_keys(model, tok, 1, more_requests()).T.double()
    a = encore.system(model, tok, 1, kn)
    c = encore.moments[1].mom2.double()
    expect = 20000.0 * c + 10.0 * torch.eye(c.shape[0], dtype=torch.float64) + k @ k.T + kn @ kn.T
    torch.testing.assert_close(a, expect)
    revert(model, applied)


# -- solver choices on singular systems ----------------------------------------------------------------------------

def test_system_solvers_on_a_singular_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # an exactly dead unit
    a = x.T @ x  # rank 4 of 12, row and column 5 zero
    b = x.T @ torch.randn(4, 3, generator=g, dtype=torch.float64)  # in the range of A
    with pytest.raises(lc.EditorError, match="singular.*lstsq"):
        lc.solve_system(a, b, "solve", "float64")
    with pytest.raises(lc.EditorError, match="lstsq"):
        lc.solve_system(a, b, "cholesky", "float64")
    sol, diag = lc.solve_system(a, b, "lstsq", "float64")
    torch.testing.assert_close(a @ sol, b, rtol=1e-8, atol=1e-8)  # b is in the range of A
    assert diag["condition"] == float("inf")


# -- batched efficacy on a world (slow: world:small, one batch of 100) ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("editor,options", [
    ("memit", ["editor.mom2_update_weight=20"]), ("emmet", []), ("alphaedit", ["editor.nullspace_threshold=0.5"]),
    ("encore", ["editor.mom2_update_weight=20", "editor.update_norm_lambda=1"])])
def test_a_batch_of_100_edits_reaches_90_percent_efficacy_on_world_small(editor, options, tmp_path):
    """The world:small options of bench/bench_memit.py (README "Editors"), 40 z steps, 100 unique subjects in one
    call through `seqedit run`: measured 0.94-0.97 (bench/results/memit_*.json, calibration)."""
    from seqedit.cli import main
    from seqedit.io import read_jsonl

    args = ["model.name=world:small", f"runs_dir={tmp_path}", "threads=2", "n_edits=100", "batch_size=100",
            "data.unique_subjects=true", "eval.final=false", "probes=[]", f"editor.name={editor}", "editor.layers=[0]",
            "editor.value.num_grad_steps=40", *options]
    assert main(["run", *args, "--no-report"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (rec,) = read_jsonl(run / "telemetry" / "edits.jsonl")
    assert rec["immediate/efficacy"] >= 0.9, rec["immediate/efficacy"]
