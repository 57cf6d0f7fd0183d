"""Load the model under edit (HF hub id, local folder or the embedded synthetic world) and fingerprint its weights.

Loading never downloads behind the user's back: with `HF_HUB_OFFLINE` set (as on the test machines) or a local
folder, transformers gets `local_files_only=True`, and a hub id that is not in the local HF cache fails before
transformers is asked, with a message that says how to provide the model.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqedit.archs import ArchSpec, arch_for, spec_for_model_type
from seqedit.config import ModelConfig

log = logging.getLogger(__name__)

WORLD_PREFIX = "world:"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's truthy env values


class ModelLoadError(ValueError):
    """The model cannot be loaded as configured; the message names the value at fault and the way out."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    arch: ArchSpec
    name: str
    world: object | None = None  # the seqedit.world.World when loaded from "world:<preset>"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------------
# Option parsing (done before anything is loaded, so a typo fails fast)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ModelLoadError(f"model.dtype: {name!r} is not allowed; allowed: {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda"; "cuda:N" (checked against the visible GPUs)."""
    allowed = "auto, cpu, cuda, cuda:N"
    if not isinstance(name, str):
        raise ModelLoadError(f"model.device: {name!r} is not allowed; allowed: {allowed}")
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index: int | None = None
        if text != "cuda":
            suffix = text[len("cuda:"):]
            if not suffix.isdigit():
                raise ModelLoadError(f"model.device: {name!r} is not allowed; allowed: {allowed}")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"model.device: {name!r} asks for CUDA but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); use device=cpu or device=auto"
            )
        if index is not None and index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"model.device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return torch.device("cuda", index if index is not None else torch.cuda.current_device())
    raise ModelLoadError(f"model.device: {name!r} is not allowed; allowed: {allowed}")


def hub_offline() -> bool:
    # Read at call time: huggingface_hub freezes its own constant at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant as a local folder.
    return name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _in_hf_cache(repo_id: str, revision: str | None, cache_dir: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # malformed ids raise HFValidationError; treat as "not cached" and report below
        return False
    return isinstance(hit, str)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_model(
    cfg: ModelConfig, cache_dir: str | Path | None = None, progress: Callable[..., Any] | None = None
) -> LoadedModel:
    """Load `cfg.name` in `cfg.dtype` on `cfg.device`, in eval mode with every parameter frozen.

    Editors switch on gradients for what they optimise. The tokenizer pads on the right (ROME-style subject indices
    count from the left) and has a pad token (eos when the checkpoint has none). `cache_dir` and `progress` are
    only used for "world:<preset>" (seqedit's own cache, not the HF cache).
    """
    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    name = cfg.name
    preset = world_preset(name)

    world = None
    if preset is not None:
        from seqedit.world import load_world  # lazy: building a world pulls in its generator and trainer

        world = load_world(preset, cache_dir=cache_dir, progress=progress)
        model, tokenizer = world.model, world.tokenizer
        arch = arch_for(model)
        model = model.to(device=device, dtype=dtype)
    else:
        model, tokenizer, arch = _load_hf(cfg, dtype, device)

    check_vocabulary(tokenizer, model, name)
    model.eval()
    model.requires_grad_(False)
    _fix_padding(tokenizer, model, name)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, name=name, world=world)


def world_preset(name: Any) -> str | None:
    """The preset of "world:<preset>", None for an HF id or folder; an empty name or preset fails here."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model.name: {name!r} is empty; give an HF id, a local folder or world:<preset>")
    if not name.startswith(WORLD_PREFIX):
        return None
    preset = name[len(WORLD_PREFIX):].strip()
    if not preset:
        raise ModelLoadError(f"model.name: {name!r} names no preset; use world:<preset>, e.g. world:small")
    return preset


def resolve_hf_config(cfg: ModelConfig) -> tuple[Any, str, dict[str, Any], str]:
    """Find `cfg.name` (local folder or hub id) and read its AutoConfig, no weights: (config, source, kw, where).

    `source` and `kw` are what the `from_pretrained` calls take, `where` names the model in messages.
    """
    from transformers import AutoConfig

    name = cfg.name
    path = Path(name).expanduser()
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if path.is_dir():
        source, where = str(path), f"local folder {str(path)!r}"
        kw["local_files_only"] = True
    elif path.exists() or _looks_like_path(name):
        raise ModelLoadError(
            f"model.name: {name!r} is not a model folder ({'not a directory' if path.exists() else 'no such path'}); "
            "give a folder written by save_pretrained, a hub id (org/name) or world:<preset>"
        )
    else:
        source, where = name, f"hub id {name!r}"
        kw["revision"] = cfg.revision
        hub_cache = hf_cache_dir()
        kw["cache_dir"] = str(hub_cache)
        cached = _in_hf_cache(name, cfg.revision, hub_cache)
        if hub_offline():
            kw["local_files_only"] = True
            if not cached:
                rev = f" at revision {cfg.revision!r}" if cfg.revision else ""
                raise ModelLoadError(
                    f"model {name!r}{rev} is not a local folder and not in the local HF cache ({hub_cache}); "
                    "HF_HUB_OFFLINE is set, so no download is attempted. Provide it as a local path "
                    "(model.name=/path/to/folder written by save_pretrained), pre-populate the HF cache "
                    "(e.g. `huggingface-cli download` on a machine with network, then copy the cache), "
                    "or unset HF_HUB_OFFLINE to let transformers download it."
                )
        elif not cached:
            log.info("model %s is not in the HF cache %s; transformers will download it", name, hub_cache)

    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {where}: {e}") from e
    return config, source, kw, where


def arch_from_config(config: Any, where: str) -> ArchSpec:
    """The ArchSpec serving an HF config's model_type; rejects unsupported models before their weights load."""
    try:
        return spec_for_model_type(getattr(config, "model_type", None))
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from e


def _load_hf(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any, ArchSpec]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, source, kw, where = resolve_hf_config(cfg)
    arch = arch_from_config(config, where)

    # Straight onto the GPU when one is asked for (no full CPU copy of a large model first).
    device_map = {"": str(device)} if device.type == "cuda" else None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, device_map=device_map, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except OSError as e:
        hint = " (HF_HUB_OFFLINE is set, so nothing was downloaded)" if kw.get("local_files_only") else ""
        raise ModelLoadError(f"cannot load {where}{hint}: {e}") from e
    if device_map is None:
        model = model.to(device)
    return model, tokenizer, arch


def check_vocabulary(tokenizer: Any, model: nn.Module, name: str) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding row for.

    Such a pair loads fine and fails much later (an index error in the first forward pass, or worse on CUDA, a
    device-side assert). More rows than tokens is normal (GPT-J pads 50,257 tokens to 50,400 rows) and accepted."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:  # not an nn.Embedding: nothing to compare with
        return
    problem = vocabulary_problem(tokenizer, rows, name)
    if problem is not None:
        raise ModelLoadError(problem)


def vocabulary_problem(tokenizer: Any, rows: int, name: str) -> str | None:
    """The refusal message when `tokenizer` has more tokens than `rows` embedding rows, else None (shared by
    `check_vocabulary` and preflight, which compares with the config's vocab_size before any weights load)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    # len() counts added tokens; the largest id also catches a vocabulary with gaps in its ids.
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    if size <= rows:
        return None
    return (f"model.name={name!r}: the tokenizer has {size} tokens (ids 0..{size - 1}) but the model's input "
            f"embedding has {rows} rows (ids 0..{rows - 1}): they were not saved together. Put the tokenizer the "
            "model was trained with next to it (save_pretrained into the model folder), or resize the model "
            "(model.resize_token_embeddings(len(tokenizer))) and save it again")


def _fix_padding(tokenizer: Any, model: nn.Module, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {name!r} has neither a pad nor an eos token; give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # subject token indices are counted from the left
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id  # silences "Setting pad_token_id to eos" on every generate


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def model_fingerprint(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """sha256 over name, dtype, shape and raw bytes of the named parameters (all parameters if None).

    Names are sorted and de-duplicated, so the key does not depend on the order they are given in; tied
    parameters count once when `names` is None (named_parameters de-duplicates them).
    """
    params = dict(model.named_parameters())
    if names is None:
        chosen = sorted(params)
    else:
        if isinstance(names, str):
            raise TypeError("model_fingerprint: names must be a sequence of parameter names, not one string")
        chosen = sorted(set(names))
        for n in chosen:
            if n not in params:
                try:
                    params[n] = model.get_parameter(n)  # e.g. a tied alias such as GPT-2's lm_head.weight
                except AttributeError:
                    close = difflib.get_close_matches(n, list(params), n=3, cutoff=0.6)
                    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                    raise ValueError(
                        f"model_fingerprint: the model has no parameter {n!r} ({len(params)} parameters){hint}"
                    ) from None
    h = hashlib.sha256()
    for n in chosen:
        t = params[n].detach()
        h.update(f"{n}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        # Raw bytes (uint8 view) work for every dtype, bf16 included, which numpy cannot hold.
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()
