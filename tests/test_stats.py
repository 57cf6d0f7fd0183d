"""Second-moment statistics: exact values, sample units, sources, the safetensors cache and its failure modes."""
from __future__ import annotations

import json
import shutil
from unittest import mock

import pytest
import torch

from seqedit.archs import arch_for, get_module
from seqedit import stats as st
from seqedit.editors import _locate as lc
from seqedit.hooks import capture
from seqedit.scoring import prompt_ids

from _rome_fixtures import corpus, make_model, make_tokenizer, write_text


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tok):
    return make_model("gpt2", len(tok))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("stats_text"), n=120)


def reference_moment(model, tok, module_name, docs):
    """Σ kkᵀ / n from one unpadded forward pass per document."""
    total, n = None, 0
    for doc in docs:
        ids = torch.tensor([prompt_ids(tok, doc)])
        with capture(model, [module_name], outputs=False) as cap:
            model(input_ids=ids)
        k = cap.inputs[module_name][0].double()  # [T, d]
        total = k.T @ k if total is None else total + k.T @ k
        n += k.shape[0]
    return total / n, n


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_second_moment_equals_per_document_reference(kind, tok, text):
    model = make_model(kind, len(tok))
    arch = arch_for(model)
    docs = corpus(120, 1)[:40]
    # small batches force padding inside batches; padded positions must not count
    spec = st.StatsSpec(n_samples=40, unit="documents", batch_tokens=64, dtype="float64")
    got = st.layer_second_moment(model, tok, arch, 1, [text], spec=spec, cache_dir=None)
    ref, n = reference_moment(model, tok, arch.mlp_out(1), docs)
    assert got.count == n and got.n_documents == 40
    torch.testing.assert_close(got.mom2, ref, rtol=1e-5, atol=1e-9)
    assert got.mom2.dtype == torch.float64 and not got.from_cache


def test_token_unit_counts_tokens_exactly_and_float32_storage(tok, gpt2, text, tmp_path):
    arch = arch_for(gpt2)
    spec = st.StatsSpec(n_samples=333, unit="tokens", dtype="float32", batch_tokens=100)
    seen = []
    got = st.layer_second_moment(gpt2, tok, arch, 0, [text], spec=spec, cache_dir=tmp_path,
                                 progress=lambda done, total: seen.append((done, total)))
    assert got.count == 333 and got.mom2.dtype == torch.float32
    assert seen[-1] == (333, 333) and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    again = st.layer_second_moment(gpt2, tok, arch, 0, [text], spec=spec, cache_dir=tmp_path)
    assert again.from_cache and torch.equal(again.mom2, got.mom2)


def test_jsonl_and_saved_dataset_sources_give_the_same_moment(tok, gpt2, tmp_path):
    import datasets

    arch = arch_for(gpt2)
    docs = corpus(60, 2)
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(docs) + "\n\n")  # a blank line is skipped
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    spec = st.StatsSpec(n_samples=1000)
    a = st.layer_second_moment(gpt2, tok, arch, 1, [txt], spec=spec)
    b = st.layer_second_moment(gpt2, tok, arch, 1, [jsonl], spec=spec)
    c = st.layer_second_moment(gpt2, tok, arch, 1, [folder], spec=spec)
    assert a.n_documents == b.n_documents == c.n_documents == 60
    torch.testing.assert_close(a.mom2, b.mom2)
    torch.testing.assert_close(a.mom2, c.mom2)


def test_cache_is_reused_without_recomputing(tok, gpt2, text, tmp_path):
    arch = arch_for(gpt2)
    spec = st.StatsSpec(n_samples=80)
    first = st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    assert first.path is not None and first.path.exists() and first.seconds > 0
    with mock.patch.object(st, "compute_second_moments", side_effect=AssertionError("recomputed")):
        second = st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    assert second.from_cache and second.count == first.count
    assert torch.equal(second.mom2, first.mom2)
    # another sample count, layer or text is another entry
    other = st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=st.StatsSpec(n_samples=81), cache_dir=tmp_path)
    assert other.path != first.path and not other.from_cache


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "metadata"])
def test_damaged_cache_is_detected_and_recomputed(damage, tok, gpt2, text, tmp_path):
    from safetensors.torch import save_file

    arch = arch_for(gpt2)
    spec = st.StatsSpec(n_samples=80)
    good = st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    path = good.path
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        mom2 = good.mom2
        if damage == "wrong_shape":
            mom2 = torch.zeros(3, 3, dtype=torch.float64)
        else:
            meta["n_samples"] = "12345"
        save_file({"mom2": mom2}, str(path), metadata=meta)
    calls = []
    real = st.compute_second_moments

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with mock.patch.object(st, "compute_second_moments", side_effect=counting):
        fixed = st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    assert calls == [1] and not fixed.from_cache
    torch.testing.assert_close(fixed.mom2, good.mom2)
    assert st.layer_second_moment(gpt2, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path).from_cache


def test_cache_of_another_model_is_rejected(tok, text, tmp_path):
    a, b = make_model("gpt2", len(tok), seed=0), make_model("gpt2", len(tok), seed=1)
    arch = arch_for(a)
    spec = st.StatsSpec(n_samples=80)
    sa = st.layer_second_moment(a, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    # the other model never picks up the first model's entry: its key differs
    sb = st.layer_second_moment(b, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)
    assert sb.path != sa.path and not sb.from_cache
    assert not torch.allclose(sa.mom2, sb.mom2)
    # a file of model a put where model b's statistics belong is refused with a clear error
    shutil.copyfile(sa.path, sb.path)
    with pytest.raises(st.StatsCacheError, match="another model"):
        st.layer_second_moment(b, tok, arch, 1, [text], spec=spec, cache_dir=tmp_path)


def test_fingerprint_ignores_the_rewritten_matrix_and_higher_layers(tok):
    model = make_model("gpt2", len(tok))
    arch = arch_for(model)
    fp = st.model_fingerprint(model, arch, 1)
    with torch.no_grad():
        get_module(model, arch.mlp_out(1)).weight.add_(1.0)
        get_module(model, arch.mlp_out(2)).weight.add_(1.0)
        model.transformer.ln_f.weight.add_(1.0)
    assert st.model_fingerprint(model, arch, 1) == fp
    with torch.no_grad():
        get_module(model, arch.mlp_in(1)).weight.add_(1.0)
    assert st.model_fingerprint(model, arch, 1) != fp
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0
    assert st.model_fingerprint(model, arch, 2) != st.model_fingerprint(make_model("gpt2", len(tok)), arch, 2)


def test_too_few_tokens_names_the_requirement(tok, gpt2, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Kalomi Ranvel plays the sport of tennis.\n")
    d = get_module(gpt2, arch_for(gpt2).mlp_out(0)).weight.shape[0]
    with pytest.raises(st.StatsError, match=rf"needs at least {d} tokens"):
        st.layer_second_moment(gpt2, tok, arch_for(gpt2), 0, [short], cache_dir=tmp_path)


def test_missing_or_unsupported_sources_are_clear_errors(tok, gpt2, tmp_path):
    arch = arch_for(gpt2)
    with pytest.raises(st.StatsError, match="not found"):
        st.layer_second_moment(gpt2, tok, arch, 0, [tmp_path / "missing.txt"])
    with pytest.raises(st.StatsError, match="no text configured"):
        st.layer_second_moment(gpt2, tok, arch, 0, [])
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(st.StatsError, match="unsupported file type"):
        st.layer_second_moment(gpt2, tok, arch, 0, [bad])
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"txt": "no text field"}\n')
    with pytest.raises(st.StatsError, match="line 1"):
        st.layer_second_moment(gpt2, tok, arch, 0, [broken])
    with pytest.raises(ValueError, match="allowed: documents, tokens"):
        st.StatsSpec(unit="sentences")


def test_default_statistics_are_the_published_float32_documents():
    spec = st.StatsSpec()
    assert (spec.dtype, spec.unit, spec.n_samples, spec.source) == ("float32", "documents", 100_000, ())


def test_solvers_agree_on_a_regular_c_and_ridge_is_only_what_is_configured():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    c = x.T @ x / 200
    k = torch.randn(16, generator=g, dtype=torch.float64)
    for method in ("cholesky", "pinv"):
        s = lc.make_solver(c, method=method)
        assert s.ridge == 0.0 and s.method == method
        torch.testing.assert_close(c @ s.solve(k), k)
    inv = lc.make_solver(c.float(), method="inverse")  # the published route: float32 inverse, float32 product
    assert inv.matrix.dtype == torch.float32
    torch.testing.assert_close(c @ inv.solve(k), k, rtol=1e-4, atol=1e-4)
    ev = torch.linalg.eigvalsh(c)
    assert inv.condition == pytest.approx(float(ev[-1] / ev[0]), rel=1e-3)
    r = lc.make_solver(c, method="cholesky", ridge=0.5)
    torch.testing.assert_close((c + 0.5 * torch.trace(c) / 16 * torch.eye(16, dtype=torch.float64)) @ r.solve(k), k)
    with pytest.raises(ValueError, match="not allowed"):
        lc.make_solver(c, method="auto")


def test_singular_c_behaviour_of_each_solver():
    """A numerically singular C (rank 8 of 16, as dead units give): the published float32 inverse returns the huge
    solution the original returns (no ridge is added behind the user's back), cholesky refuses it naming the fixes,
    pinv gives the minimum-norm solution; an exactly singular C (a zero row) makes the inverse fail clearly."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    singular = (x.T @ x / 8).float()
    k = torch.randn(16, generator=g, dtype=torch.float64)
    regular = lc.make_solver(lc._ridged(singular, 1e-2), method="cholesky").solve(k)
    huge = lc.make_solver(singular, method="inverse").solve(k)
    assert float(huge.norm()) > 1e3 * float(regular.norm())  # the disabling-edit regime of the original
    with pytest.raises(st.StatsError, match="singular.*ridge"):
        lc.make_solver(singular, method="cholesky")
    p = lc.make_solver(singular, method="pinv")
    proj = p.solve(k)
    u, sv, _ = torch.linalg.svd(singular.double())
    rng = u[:, :8]  # range of C
    torch.testing.assert_close(singular.double() @ proj, rng @ (rng.T @ k), rtol=1e-4, atol=1e-4)
    assert float(proj.norm()) < float(huge.norm()) / 1e3
    assert p.condition > 1e6
    exact = singular.clone()
    exact[3, :] = 0
    exact[:, 3] = 0
    with pytest.raises(st.StatsError, match="exactly singular.*solver=pinv"):
        lc.make_solver(exact, method="inverse")

def test_several_layers_in_one_pass_equal_single_layers_and_reuse_the_cache(tok, gpt2, text, tmp_path):
    arch = arch_for(gpt2)
    spec = st.StatsSpec(n_samples=60)
    one = st.layer_second_moment(gpt2, tok, arch, 0, [text], spec=spec, cache_dir=tmp_path)
    calls = []
    real = st.compute_second_moments

    def counting(model, tokenizer, names, *a, **k):
        calls.append(list(names))
        return real(model, tokenizer, names, *a, **k)

    with mock.patch.object(st, "compute_second_moments", side_effect=counting):
        both = st.layer_second_moments(gpt2, tok, arch, [2, 0, 1], [text], spec=spec, cache_dir=tmp_path)
    assert calls == [[arch.mlp_out(1), arch.mlp_out(2)]]  # layer 0 came from the cache; 1 and 2 in one pass
    assert list(both) == [0, 1, 2] and both[0].from_cache and not both[2].from_cache
    torch.testing.assert_close(both[0].mom2, one.mom2)
    for layer in (1, 2):
        alone = st.layer_second_moment(gpt2, tok, arch, layer, [text], spec=spec, cache_dir=None)
        torch.testing.assert_close(both[layer].mom2, alone.mom2)
        assert both[layer].count == alone.count
