"""load_model on tiny saved models of every family (offline), its errors, the world delegation and fingerprints."""
from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import seqedit.world
from seqedit import model_io
from seqedit.config import ModelConfig
from seqedit.model_io import LoadedModel, ModelLoadError, load_model, model_fingerprint


import _arch_fixtures as fx  # noqa: E402  (tests/ is on sys.path via pytest pythonpath)
torch.set_num_threads(1)
BY_KEY = {f.key: f for f in fx.FAMILIES}
LOAD_KEYS = [k for k in fx.FAMILY_IDS if k != "gpt2-square"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # Tests never touch the network nor the user's HF cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family key -> (folder, in-memory model it was saved from)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {k: (root / k, fx.save_tiny(k, root / k)) for k in LOAD_KEYS}


def _record_model_kwargs(monkeypatch) -> list[dict]:
    """Spy on AutoModelForCausalLM.from_pretrained (still loads) to check what load_model asked for."""
    import transformers

    seen: list[dict] = []
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kw):
        seen.append(kw)
        return orig(*args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return seen


def _frozen_eval(model: torch.nn.Module) -> None:
    assert not model.training and all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("key", LOAD_KEYS)
def test_load_local_folder(saved, key, dtype):
    folder, original = saved[key]
    fam = BY_KEY[key]
    lm = load_model(ModelConfig(name=str(folder), dtype=dtype, device="cpu"))
    assert isinstance(lm, LoadedModel)
    assert type(lm.model).__name__ == fam.model_class
    assert lm.arch.name == fam.spec and lm.name == str(folder) and lm.world is None
    assert {p.dtype for p in lm.model.parameters()} == {model_io.DTYPES[dtype]}
    assert lm.dtype == model_io.DTYPES[dtype] and lm.device == torch.device("cpu")
    _frozen_eval(lm.model)
    tok = lm.tokenizer
    assert tok.pad_token == fx.EOS == tok.eos_token  # saved without a pad token: eos stands in
    assert tok.padding_side == "right"  # saved with "left"
    assert lm.model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["The capital of France is", "Paris"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 1 and batch["attention_mask"][1, -1] == 0  # right padding
    if dtype == "float32":
        # the weights are the saved ones (not a fresh random init), bit for bit
        assert model_fingerprint(lm.model) == model_fingerprint(original)
        ids = fx.token_batch()
        with torch.no_grad():
            torch.testing.assert_close(lm.model(ids).logits, original(ids).logits)
    else:
        assert model_fingerprint(lm.model) != model_fingerprint(original)


def test_existing_pad_token_is_kept(tmp_path, monkeypatch):
    fx.save_tiny("gpt2", tmp_path / "m", pad=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = _record_model_kwargs(monkeypatch)
    lm = load_model(ModelConfig(name=str(tmp_path / "m"), device="cpu"))
    assert seen[0]["local_files_only"] is True  # a local folder never reaches out, offline mode or not
    assert lm.tokenizer.pad_token == "<pad>" != lm.tokenizer.eos_token
    assert lm.tokenizer.padding_side == "right"


def test_load_hub_id_from_local_hf_cache(saved, tmp_path, monkeypatch):
    """A hub id found in a pre-populated HF cache loads offline (no download)."""
    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--seqedit-test--tiny-llama"
    shutil.copytree(saved["llama"][0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    seen = _record_model_kwargs(monkeypatch)
    lm = load_model(ModelConfig(name="seqedit-test/tiny-llama", device="cpu"))
    assert seen[0]["local_files_only"] is True and seen[0]["cache_dir"] == str(cache)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert model_fingerprint(lm.model) == model_fingerprint(saved["llama"][1])
    # a revision that the cache does not hold is not fetched either
    with pytest.raises(ModelLoadError, match="no download is attempted"):
        load_model(ModelConfig(name="seqedit-test/tiny-llama", revision="v9", device="cpu"))


def test_uncached_hub_id_offline_fails_without_trying(monkeypatch):
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("transformers was asked to load an uncached model")

    for cls in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", forbidden)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(name="seqedit-test/does-not-exist", device="cpu"))
    msg = str(err.value)
    assert "'seqedit-test/does-not-exist'" in msg and "no download is attempted" in msg
    assert "local path" in msg and "HF_HUB_OFFLINE" in msg and "HF cache" in msg


def test_online_uncached_hub_id_is_left_to_transformers(monkeypatch):
    """Without HF_HUB_OFFLINE an uncached hub id goes to transformers (which may download), pinned revision."""
    import transformers

    seen = {}

    def fake_config(source, **kw):
        seen.update(kw, source=source)
        raise OSError("offline test double")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    with pytest.raises(ModelLoadError, match="cannot read the model config of hub id 'org/some-model'"):
        load_model(ModelConfig(name="org/some-model", revision="abc123", device="cpu"))
    assert seen["source"] == "org/some-model" and seen["revision"] == "abc123"
    assert "local_files_only" not in seen


def test_missing_local_path_is_a_clear_error(tmp_path):
    for name in (str(tmp_path / "no" / "such" / "model"), "./no/such/model"):
        with pytest.raises(ModelLoadError, match="no such path"):
            load_model(ModelConfig(name=name, device="cpu"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(ModelConfig(name=str(tmp_path / "file.bin"), device="cpu"))
    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        load_model(ModelConfig(name=str(tmp_path), device="cpu"))  # a folder without config.json


@pytest.mark.parametrize("which", ["bert", "t5"])
def test_unsupported_architecture_fails_before_weights(tmp_path, which):
    import transformers

    if which == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True)
    else:
        cfg = transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    cfg.save_pretrained(tmp_path)  # config only: the check must not need weights
    with pytest.raises(ModelLoadError, match=f"unsupported architecture '{cfg.model_type}'") as err:
        load_model(ModelConfig(name=str(tmp_path), device="cpu"))
    assert "supported model types: gpt2, gpt_neox, gptj, llama, mistral, qwen2" in str(err.value)


@pytest.mark.parametrize("bad", ["float64", "fp16", "bf16", ""])
def test_bad_dtype(bad):
    with pytest.raises(ModelLoadError, match="allowed: float32, bfloat16, float16") as err:
        load_model(ModelConfig(name="seqedit-test/does-not-exist", dtype=bad, device="cpu"))
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "cuda:-1", "mps"])
def test_bad_device(bad):
    with pytest.raises(ModelLoadError, match="allowed: auto, cpu, cuda, cuda:N") as err:
        load_model(ModelConfig(name="seqedit-test/does-not-exist", device=bad))
    assert repr(bad) in str(err.value)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ModelLoadError, match="CUDA but torch.cuda.is_available"):
            load_model(ModelConfig(name="seqedit-test/does-not-exist", device=dev))
    assert model_io.resolve_device("auto") == torch.device("cpu")
    assert model_io.resolve_device("cpu") == torch.device("cpu")


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert model_io.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelLoadError, match="only 2 CUDA device"):
        model_io.resolve_device("cuda:2")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_world_name_delegates_to_load_world(monkeypatch, tmp_path, dtype):
    model, tok = fx.tiny_model("gpt2"), fx.tiny_tokenizer()
    model.train()
    calls = []

    def fake_load_world(preset, cache_dir=None, progress=None):
        calls.append((preset, cache_dir, progress))
        return SimpleNamespace(model=model, tokenizer=tok, path=tmp_path)

    monkeypatch.setattr(seqedit.world, "load_world", fake_load_world, raising=False)
    progress = object()
    lm = load_model(ModelConfig(name="world:small", dtype=dtype, device="cpu"), cache_dir=tmp_path, progress=progress)
    assert calls == [("small", tmp_path, progress)]
    assert lm.world is not None and lm.world.path == tmp_path
    assert lm.arch.name == "gpt2" and lm.name == "world:small"
    assert lm.dtype == model_io.DTYPES[dtype]
    _frozen_eval(lm.model)
    assert lm.tokenizer.pad_token == fx.EOS and lm.tokenizer.padding_side == "right"


def test_world_name_without_preset(monkeypatch):
    monkeypatch.setattr(seqedit.world, "load_world", lambda *a, **k: pytest.fail("called"), raising=False)
    with pytest.raises(ModelLoadError, match="names no preset"):
        load_model(ModelConfig(name="world:", device="cpu"))


def test_fingerprint_stable_and_sensitive():
    model = fx.tiny_model("llama")
    fp = model_fingerprint(model)
    assert len(fp) == 64 and fp == model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == fp
    assert model_fingerprint(fx.tiny_model("llama", seed=1)) != fp

    spec_out = "model.layers.1.mlp.down_proj.weight"
    other = "model.layers.0.self_attn.q_proj.weight"
    sub = model_fingerprint(model, [spec_out])
    assert sub != fp
    assert model_fingerprint(model, [spec_out, other]) == model_fingerprint(model, [other, spec_out, other])
    with torch.no_grad():
        model.get_parameter(other)[0, 0] += 1e-3
    assert model_fingerprint(model) != fp
    assert model_fingerprint(model, [spec_out]) == sub  # an unnamed parameter does not count
    with torch.no_grad():
        model.get_parameter(spec_out)[3, 5] += 1e-3
    assert model_fingerprint(model, [spec_out]) != sub

    with pytest.raises(ValueError, match="no parameter 'model.layers.1.mlp.down_proj.wieght'.*did you mean"):
        model_fingerprint(model, ["model.layers.1.mlp.down_proj.wieght"])
    with pytest.raises(TypeError):
        model_fingerprint(model, spec_out)  # a bare string is not a list of names


def test_fingerprint_dtype_and_tied_weights():
    model = fx.tiny_model("gpt2")
    fp32 = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fp32
    # GPT-2 ties lm_head to wte: the alias is accepted by name; names are part of the hash
    assert model_fingerprint(model, ["lm_head.weight"]) != model_fingerprint(model, ["transformer.wte.weight"])
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_cuda_device_loads_straight_onto_the_gpu(saved, monkeypatch):
    """No GPU here: check the request (device_map to the chosen GPU, so no full CPU copy of a large model)."""
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen: list[dict] = []
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def fake(source, **kw):
        seen.append(dict(kw))
        kw.pop("device_map")
        return orig(source, **kw)  # loaded on the CPU; load_model must not move it again itself

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    lm = load_model(ModelConfig(name=str(saved["gpt2"][0]), device="cuda", dtype="float16"))
    assert seen[0]["device_map"] == {"": "cuda:0"} and seen[0]["dtype"] == torch.float16
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float16


def test_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path):
    from tests_support import make_tokenizer

    folder = tmp_path / "mismatched"
    fx.tiny_model("gpt2").save_pretrained(folder)  # 128 embedding rows
    big = make_tokenizer(vocab_size=300)  # trained separately: ids up to ~300
    big.save_pretrained(folder)
    n = len(big)
    assert n > fx.VOCAB
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(name=str(folder), device="cpu"))
    msg = str(info.value)
    assert f"tokenizer has {n} tokens" in msg and f"embedding has {fx.VOCAB} rows" in msg and str(folder) in msg
    # Fewer tokens than rows is how real checkpoints pad their embeddings: accepted, and the ids do run.
    fx.tiny_tokenizer().save_pretrained(folder)
    lm = load_model(ModelConfig(name=str(folder), device="cpu"))
    assert len(lm.tokenizer) < fx.VOCAB
    lm.model(**lm.tokenizer("The capital of France is Paris.", return_tensors="pt"))
