"""Causal tracing and gradient share: exact-restoration identities, zero noise, batching, hand-computed gradient
share, hook hygiene, every architecture family, and the `seqedit trace` CLI on a model saved to disk."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from seqedit.archs import arch_for, get_module, num_layers
from seqedit.tokens import fill, subject_token_span
from seqedit.hooks import capture
from seqedit.model_io import model_fingerprint
from seqedit.scoring import prompt_ids, target_ids
from seqedit.trace import CATEGORIES, category_positions, gradient_share, trace, window_layers
from seqedit.types import EditRequest

from _arch_fixtures import FAMILY_IDS, tiny_model, tiny_tokenizer
from _rome_fixtures import make_model, make_tokenizer, requests


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def facts():
    # Multi-token subjects at the start, middle and before a long tail; r4 is a one-token subject before the last token.
    return requests() + [EditRequest("r3", "The mother tongue of {} is known to be", "Velmi Kalo", "French", "Dutch"),
                         EditRequest("r4", "{} is", "Tu", "Kalo", "Ranvel")]


@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of tiny forwards: one thread is faster, and two threads spin badly when another process holds a core.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpen a random model's output (scale the final norm) so that probabilities react visibly to noise."""
    with torch.no_grad():
        get_module(model, arch_for(model).ln_f).weight.mul_(20.0)
    return model


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_subject_token_span_covers_the_subject(tok, facts):
    for r in facts:
        s0, s1 = subject_token_span(tok, r.prompt, r.subject)
        ids = prompt_ids(tok, r.text)
        assert ids[0] == tok.bos_token_id and s0 >= 1
        assert tok.decode(ids[s0:s1]).strip() == r.subject
        assert r.subject not in tok.decode(ids[s0 + 1 : s1]) and r.subject not in tok.decode(ids[s0 : s1 - 1])


class _SlowView:
    """The fixture tokenizer seen as a slow one (no offset mapping): exercises the fallback path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_subject_token_span_slow_path_agrees(tok, facts):
    slow = _SlowView(tok)
    for r in facts:
        assert subject_token_span(slow, r.prompt, r.subject) == subject_token_span(tok, r.prompt, r.subject)


def test_categories_and_window():
    # BOS, 3-token subject at 3..5 after a 2-token prefix, then 3 more tokens: 0 | 1 2 | 3 4 5 | 6 7 8
    pos = category_positions(True, (3, 6), 9)
    assert pos == {"bos": [0], "subject_first": [3], "subject_middle": [4], "subject_last": [5],
                   "first_after": [6], "further": [7], "last": [8]}
    # one-token subject right before the last token, no BOS
    assert category_positions(False, (0, 1), 2) == {"subject_first": [0], "subject_last": [0], "first_after": [1],
                                                      "last": [1]}
    assert window_layers(5, 10, 48) == list(range(0, 10))
    assert window_layers(0, 1, 4) == [0] and window_layers(3, 2, 4) == [2, 3] and window_layers(3, 4, 4) == [1, 2, 3]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_restoration_identities_and_batching(tok, facts, kind):
    model = peaked(make_model(kind, len(tok)))
    before = model_fingerprint(model)
    hooks = hook_count(model)
    flags = [p.requires_grad for p in model.parameters()]
    common = dict(samples=2, known_only=False, seed=3, grad_share=False, window=2)
    res = trace(model, tok, facts, batch_size=7, **common)
    assert res.n_used == len(facts) and res.window == 2 and res.noise_std > 0
    L = num_layers(model)
    moved = 0.0
    for f in res.facts:
        P = len(f.tokens)
        # The last block's output at the last position determines the prediction: restoring it recovers p_clean.
        assert f.restored["hidden"][L - 1][P - 1] == pytest.approx(f.p_clean, abs=1e-5)
        # Block 0's output at the last position is emb + attn0 + mlp0(emb + attn0), and the embedding there is clean:
        # restoring it equals restoring attn0's output alone (with window 2, layer 0's window is layer 0 only).
        assert f.restored["hidden"][0][P - 1] == pytest.approx(f.restored["attn"][0][P - 1], abs=1e-5)
        # Positions before the subject cannot change: they hold p_corrupted by construction.
        for k in res.kinds:
            for layer in range(L):
                assert all(v == f.p_corrupted for v in f.restored[k][layer][: f.subject_span[0]])
        moved = max(moved, abs(f.p_clean - f.p_corrupted) / f.p_clean)
    assert moved > 0.05  # the noise does corrupt the run
    # Batching must not leak restorations between rows: one row per forward gives the same tables.
    single = trace(model, tok, facts, batch_size=1, **common)
    for a, b in zip(res.facts, single.facts):
        assert a.p_corrupted == pytest.approx(b.p_corrupted, abs=1e-6)
        for k in res.kinds:
            assert torch.allclose(torch.tensor(a.restored[k]), torch.tensor(b.restored[k]), atol=1e-6)
    # Aggregation: the last-layer hidden effect at "last" is the mean gap.
    gap = sum(f.p_clean - f.p_corrupted for f in res.facts) / res.n_used
    assert res.effect("hidden", "last")[L - 1] == pytest.approx(gap, abs=1e-5)
    assert res.effect("hidden", "bos") == [0.0] * L
    assert res.category_counts == {"bos": 4, "subject_first": 4, "subject_middle": 3, "subject_last": 4,
                                   "first_after": 4, "further": 2, "last": 4}
    r4 = res.facts[3]  # one-token subject: first == last token, and the token after it is the last token
    assert r4.subject_span == (1, 2) and set(r4.positions()) == {"bos", "subject_first", "subject_last",
                                                                  "first_after", "last"}
    # Nothing left behind.
    assert hook_count(model) == hooks
    assert model_fingerprint(model) == before and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_zero_noise_equals_clean(tok, facts):
    model = peaked(make_model("gpt2", len(tok)))
    res = trace(model, tok, facts, samples=2, noise=0.0, known_only=False)
    assert res.noise_std == 0.0
    for f in res.facts:
        assert f.p_corrupted == pytest.approx(f.p_clean, abs=1e-6)
    for kind in res.kinds:
        for row in res.effects[kind]:
            assert all(math.isnan(v) or abs(v) < 1e-6 for v in row)


def test_noise_is_seeded_and_known_filter(tok, facts):
    model = make_model("gpt2", len(tok))
    a = trace(model, tok, facts, kinds=("hidden",), known_only=False, seed=1, grad_share=False)
    b = trace(model, tok, facts, kinds=("hidden",), known_only=False, seed=1, grad_share=False)
    c = trace(model, tok, facts, kinds=("hidden",), known_only=False, seed=2, grad_share=False)
    assert [f.p_corrupted for f in a.facts] == [f.p_corrupted for f in b.facts]
    assert [f.p_corrupted for f in a.facts] != [f.p_corrupted for f in c.facts]
    # A random model knows none of these made-up facts: all skipped, with the reason.
    known = trace(model, tok, facts, kinds=("hidden",), grad_share=False)
    assert known.n_used == 0 and len(known.skipped) == len(facts)
    assert all("not known" in s.reason for s in known.skipped)
    assert math.isnan(known.p_clean) and known.grad is None


def test_bad_arguments(tok, facts):
    model = make_model("gpt2", len(tok))
    with pytest.raises(ValueError, match="unknown trace kind 'resid'"):
        trace(model, tok, facts, kinds=("resid",))
    with pytest.raises(ValueError, match="window must be an int in 1..3"):
        trace(model, tok, facts, window=5)
    with pytest.raises(ValueError, match="unknown measure"):
        trace(model, tok, facts, measure="logit")
    with pytest.raises(ValueError, match="noise must be"):
        trace(model, tok, facts, noise=-1.0)
    no_true = EditRequest("x", "The capital of {} is", "Kalomi Ranvel", "Zorpha")
    res = trace(model, tok, [no_true, facts[0]], known_only=False, grad_share=False)
    assert [s.case_id for s in res.skipped] == ["x"] and "target_true" in res.skipped[0].reason


def _hand_grad_norms(model, tok, req: EditRequest) -> tuple[list[float], list[float]]:
    """‖∂NLL/∂mlp_out‖ at subject-last and prompt-last, from captured (non-detached) outputs of one unpadded row."""
    arch = arch_for(model)
    p_ids = prompt_ids(tok, fill(req.prompt, req.subject)[0])
    t_ids = target_ids(tok, req.target_true)
    ids = torch.tensor([p_ids + t_ids[:-1]])
    emb = get_module(model, arch.embed)(ids).detach().requires_grad_(True)  # a leaf so that the graph exists
    names = [arch.mlp(i) for i in range(num_layers(model))]
    with capture(model, names, inputs=False, detach=False) as cap:
        logits = model(inputs_embeds=emb).logits[0]  # [T, V]
    logp = torch.log_softmax(logits, -1)
    nll = -torch.stack([logp[len(p_ids) - 1 + i, t] for i, t in enumerate(t_ids)]).mean()
    grads = torch.autograd.grad(nll, [cap.outputs[n] for n in names])
    s_last = subject_token_span(tok, req.prompt, req.subject)[1] - 1
    return ([float(g[0, s_last].norm()) for g in grads], [float(g[0, len(p_ids) - 1].norm()) for g in grads])


def test_gradient_share_matches_hand_computation(tok, facts):
    model = make_model("gpt2", len(tok))
    hooks = hook_count(model)
    gs = gradient_share(model, tok, facts, batch_size=8)  # one padded batch of different lengths
    share = gs.share
    assert len(share) == num_layers(model)
    assert all(0.0 <= v <= 1.0 for v in share)
    assert share[-1] == 0.0  # the last MLP's output at the subject position feeds no later position
    for i, req in enumerate(facts):
        s, p = _hand_grad_norms(model, tok, req)
        assert gs.subject_last[i] == pytest.approx(s, rel=1e-4, abs=1e-9)
        assert gs.prompt_last[i] == pytest.approx(p, rel=1e-4, abs=1e-9)
        assert gs.per_fact()[i][0] == pytest.approx(s[0] / (s[0] + p[0]), rel=1e-4)
    assert 0.0 < share[0] < 1.0
    assert hook_count(model) == hooks


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_every_family_without_bos(family):
    tok = tiny_tokenizer(pad=True)  # no BOS: the BOS category must be absent
    model = tiny_model(family)
    reqs = [EditRequest("a", "{} speaks", "Danielle Darrieux", "Dutch", "French"),
            EditRequest("b", "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch")]
    res = trace(model, tok, reqs, samples=2, known_only=False, window=1)
    L = num_layers(model)
    assert res.category_counts["bos"] == 0 and res.category_counts["subject_middle"] >= 1
    for f in res.facts:
        P = len(f.tokens)
        assert not f.bos
        assert f.restored["hidden"][L - 1][P - 1] == pytest.approx(f.p_clean, abs=1e-5)
        assert f.restored["hidden"][0][P - 1] == pytest.approx(f.restored["attn"][0][P - 1], abs=1e-5)
    assert all(0.0 <= v <= 1.0 for v in res.grad_share) and res.grad_share[-1] == 0.0


def test_result_serialises(tok, facts):
    model = make_model("llama", len(tok))
    res = trace(model, tok, facts[3:], samples=1, known_only=False, measure="object")
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["effects"]["hidden"][1][CATEGORIES.index("further")] is None
    res = trace(model, tok, facts, samples=1, known_only=False, measure="object")
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["n_used"] == 4 and d["measure"] == "object" and d["categories"] == list(CATEGORIES)
    assert len(d["grad_share"]["share"]) == 3
    text = res.format_tables()
    assert "[hidden]" in text and "[attn]" in text and "gradient share" in text and "subj last" in text


def test_cli_trace_smoke(tmp_path, capsys):
    from seqedit.cli import main
    from tests_support import counterfact_records, make_tiny_gpt2
    from tests_support import make_tokenizer as support_tokenizer

    tok = support_tokenizer()
    model_dir = tmp_path / "model"
    make_tiny_gpt2(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(6)))
    out = tmp_path / "out"
    rc = main(["trace", str(model_dir), "--data", str(data), "--n-facts", "3", "--samples", "2", "--out", str(out),
               "--include-unknown", "--kinds", "hidden,mlp"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[hidden]" in printed and "[mlp]" in printed and "[attn]" not in printed and "gradient share" in printed
    saved = json.loads((out / "trace.json").read_text())
    assert saved["n_used"] == 3 and saved["kinds"] == ["hidden", "mlp"] and saved["model"] == str(model_dir)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "trace_hidden.png").stat().st_size > 0 and (out / "trace_mlp.png").exists()
    # A non-world model needs --data; a bad kind is named.
    assert main(["trace", str(model_dir)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["trace", str(model_dir), "--data", str(data), "--kinds", "hidden,resid"]) == 2
    assert "'hidden,resid'" in capsys.readouterr().err


def test_cli_trace_on_error_skips_and_reports_malformed_records(tmp_path, capsys):
    from seqedit.cli import main
    from tests_support import make_tiny_gpt2
    from tests_support import make_tokenizer as support_tokenizer

    tok = support_tokenizer()
    model_dir = tmp_path / "model"
    make_tiny_gpt2(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    # zsRE records (MEND layout); two have an empty `alt`, as in the published eval file
    people = ["Danora Keltiss", "Bramwick Oltey", "Selvane Irtu", "Kelmo Rastavin"]
    rows = [{"subject": p, "src": f"Which sport does {p} play?", "pred": "hockey", "alt": "" if i in (1, 3) else
             "tennis", "answers": ["hockey"], "rephrase": f"What sport does {p} play?",
             "loc": "nq question: who plays the flute", "loc_ans": "Ivo Parnassek"} for i, p in enumerate(people)]
    data = tmp_path / "zsre_mend_eval.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    base = ["trace", str(model_dir), "--data", str(data), "--samples", "1", "--kinds", "hidden", "--out", str(out),
            "--include-unknown"]
    assert main(base) == 2  # the default is the loaders' default: the file is refused, naming the record
    err = capsys.readouterr().err
    assert "record 1" in err and "'alt' is empty" in err and "--on-error skip" in err
    assert main([*base, "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 malformed record(s) of 4" in err
    assert "record 1: field 'alt' is empty" in err and "record 3: field 'alt' is empty" in err
    saved = json.loads((out / "trace.json").read_text())
    assert [s["index"] for s in saved["skipped_records"]] == [1, 3] and saved["n_used"] == 2
