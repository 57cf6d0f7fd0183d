"""The per-architecture map on tiny random models of every family: paths exist, orientation is right, hooks clean up."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from seqedit import archs
from seqedit.hooks import capture, patch_output


import _arch_fixtures as fx  # noqa: E402  (tests/ is on sys.path via pytest pythonpath)
torch.set_num_threads(1)
BY_KEY = {f.key: f for f in fx.FAMILIES}


@pytest.fixture(scope="module", params=fx.FAMILY_IDS)
def family(request):
    fam = BY_KEY[request.param]
    return fam, fx.tiny_model(fam.key)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_arch_for_picks_the_family_spec(family):
    fam, model = family
    assert type(model).__name__ == fam.model_class
    spec = archs.arch_for(model)
    assert spec.name == fam.spec
    assert model.config.model_type in spec.model_types
    assert archs.num_layers(model) == 2


def test_every_template_resolves_for_every_layer(family):
    _, model = family
    spec = archs.arch_for(model)
    n = archs.num_layers(model)
    container = archs.get_module(model, spec.layers)
    assert isinstance(container, nn.ModuleList) and len(container) == n
    for i in range(n):
        assert archs.get_module(model, spec.layer(i)) is container[i]
        for path in (spec.mlp(i), spec.mlp_in(i), spec.mlp_out(i), spec.attn(i)):
            assert path.startswith(spec.layer(i) + "."), path
            archs.get_module(model, path)
        assert archs.get_module(model, spec.mlp_out(i)).weight is model.get_parameter(
            archs.weight_name(spec.mlp_out(i)))
    embed = archs.get_module(model, spec.embed)
    assert isinstance(embed, nn.Embedding) and embed.num_embeddings == fx.VOCAB
    assert embed is model.get_input_embeddings()
    assert archs.get_module(model, spec.lm_head) is model.get_output_embeddings()
    ln_f = archs.get_module(model, spec.ln_f)
    assert ln_f.weight.shape == (fx.D_MODEL,)
    # the final norm feeds the unembedding: its output is exactly what lm_head reads
    ids = fx.token_batch()
    with capture(model, [spec.ln_f, spec.lm_head], outputs=True) as cap:
        model(ids)
    torch.testing.assert_close(cap.inputs[spec.lm_head], cap.outputs[spec.ln_f])


def test_missing_module_is_a_clear_error(family):
    _, model = family
    with pytest.raises(ValueError, match="no module 'model.nope'"):
        archs.get_module(model, "model.nope")


def test_conv1d_only_for_gpt2_and_mlp_widths(family):
    fam, model = family
    spec = archs.arch_for(model)
    for i in range(archs.num_layers(model)):
        m_in, m_out = archs.get_module(model, spec.mlp_in(i)), archs.get_module(model, spec.mlp_out(i))
        assert archs.is_conv1d(m_out) is (fam.spec == "gpt2")
        assert archs.is_conv1d(m_in) is (fam.spec == "gpt2")
        assert archs.in_features(m_out) == fam.d_ff
        assert archs.in_features(m_in) == fx.D_MODEL
        assert tuple(archs.linear_weight(m_out).shape) == (fx.D_MODEL, fam.d_ff)  # [d_out, d_in]
        assert tuple(archs.linear_weight(m_in).shape) == (fam.d_ff, fx.D_MODEL)


def test_linear_weight_and_to_param_layout_orientation(family):
    """out = k W^T (+b) with W = linear_weight; adding to_param_layout(outer(dv, u)) changes out by (u.k) dv."""
    fam, model = family
    spec = archs.arch_for(model)
    names = [spec.mlp_out(i) for i in range(archs.num_layers(model))]
    ids = fx.token_batch()
    g = torch.Generator().manual_seed(1)
    with capture(model, names) as before:
        model(ids)
    for name in names:
        module = archs.get_module(model, name)
        k, out = before.inputs[name], before.outputs[name]  # [n, T, d_ff], [n, T, d_model]
        assert k.shape[-1] == fam.d_ff and out.shape[-1] == fx.D_MODEL
        expected = k @ archs.linear_weight(module).T
        if getattr(module, "bias", None) is not None:
            expected = expected + module.bias
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # Rank-one Linear-convention update on every layer's mlp_out. The input to each mlp_out is unchanged by
    # its own update; a later layer's input does change, so compare against a direct call of that module.
    deltas = {}
    for name in names:
        module = archs.get_module(model, name)
        dv = torch.randn(fx.D_MODEL, generator=g)
        u = torch.randn(fam.d_ff, generator=g)
        delta = torch.outer(dv, u)  # [d_out, d_in]
        stored = archs.to_param_layout(module, delta)
        assert stored.shape == module.weight.shape
        deltas[name] = (delta, stored)
    saved = {n: archs.get_module(model, n).weight.detach().clone() for n in names}
    try:
        with torch.no_grad():
            for name, (_, stored) in deltas.items():
                archs.get_module(model, name).weight.add_(stored)
        with capture(model, names) as after:
            model(ids)
        first = names[0]
        torch.testing.assert_close(after.inputs[first], before.inputs[first])
        for name in names:
            delta = deltas[name][0]
            k_now = after.inputs[name]
            module = archs.get_module(model, name)
            with torch.no_grad():
                saved_now = module.weight.detach().clone()
                module.weight.copy_(saved[name])
                base = module(k_now)
                module.weight.copy_(saved_now)
            torch.testing.assert_close(after.outputs[name] - base, k_now @ delta.T, rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            for name in names:
                archs.get_module(model, name).weight.copy_(saved[name])


def test_wrong_orientation_would_be_detected():
    """Guard for the test above: on the square GPT-2 a plain (untransposed) add gives a different output."""
    model = fx.tiny_model("gpt2-square")
    spec = archs.arch_for(model)
    module = archs.get_module(model, spec.mlp_out(0))
    assert module.weight.shape[0] == module.weight.shape[1]
    g = torch.Generator().manual_seed(2)
    k = torch.randn(3, fx.D_MODEL, generator=g)
    delta = torch.outer(torch.randn(fx.D_MODEL, generator=g), torch.randn(fx.D_MODEL, generator=g))
    with torch.no_grad():
        base = module(k)
        module.weight.add_(delta)  # wrong layout for Conv1D
        wrong = module(k) - base
    assert not torch.allclose(wrong, k @ delta.T, atol=1e-3)


def test_unsupported_architecture_lists_supported_types():
    fake = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'") as err:
        archs.arch_for(fake)
    for t in ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"):
        assert t in str(err.value)
    with pytest.raises(ValueError, match="supported model types"):
        archs.arch_for(nn.Linear(2, 2))  # no config at all
    assert archs.spec_for_model_type("mistral").name == "llama"


def test_capture_removes_hooks_also_when_body_raises():
    model = fx.tiny_model("llama")
    spec = archs.arch_for(model)
    names = [spec.mlp_out(0), spec.layer(1), spec.ln_f]
    ids = fx.token_batch()
    with capture(model, names) as cap:
        assert not _no_hooks(model)
        model(ids)
    assert set(cap.inputs) == set(names) and set(cap.outputs) == set(names)
    assert cap.outputs[spec.layer(1)].shape == (*ids.shape, fx.D_MODEL)  # block output: hidden state, not tuple
    assert _no_hooks(model)

    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, names):
            model(ids)
            raise RuntimeError("boom")
    assert _no_hooks(model)

    # a bad name after good ones: the hooks already registered are removed too
    with pytest.raises(ValueError, match="no module"):
        with capture(model, [spec.mlp_out(0), "model.nope"]):
            pass
    assert _no_hooks(model)

    with pytest.raises(RuntimeError, match="boom"):
        with patch_output(model, spec.mlp_out(0), lambda y: y * 0):
            raise RuntimeError("boom")
    assert _no_hooks(model)


def test_capture_options_and_patch_output():
    model = fx.tiny_model("gpt2")
    spec = archs.arch_for(model)
    name = spec.mlp_out(0)
    ids = fx.token_batch()
    with capture(model, [name], inputs=False) as cap:
        clean = model(ids).logits
    assert cap.inputs == {} and name in cap.outputs
    with patch_output(model, name, lambda y: y + 1.0):
        with capture(model, [name], inputs=False) as patched:
            shifted = model(ids).logits
    torch.testing.assert_close(patched.outputs[name], cap.outputs[name] + 1.0)
    assert not torch.allclose(shifted, clean)
    torch.testing.assert_close(model(ids).logits, clean)  # patch gone
    assert _no_hooks(model)
