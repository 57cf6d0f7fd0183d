"""Second-moment statistics C = E[k kᵀ] of the keys of a rewritten matrix (ROME `layer_stats`), cached on disk.

Shared by every locate-then-edit editor through its `stats:` config section (`StatsSpec`). k is the *input* of
`arch.mlp_out(layer)` (d_in = d_ff) at every non-padding token of a configured text: local .txt files (one document
per line), .jsonl files (a "text" field per line), folders written by `datasets.Dataset.save_to_disk`, or in-memory
`datasets.Dataset` objects; on the synthetic worlds the world's held-out text by default. Nothing is ever downloaded.
Accumulation is one `addmm` per batch in `dtype` (float32 as published; float64 on request) under `no_grad`, and
every forward pass stops right after the needed layer. Results are cached as safetensors in `cache_dir`, keyed by a
fingerprint of the weights that determine the keys, the layer, the text (path + content hash) and the sample count;
a damaged file is recomputed, a file holding another model's statistics is refused with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqedit.archs import ArchSpec, get_module, in_features
from seqedit.hooks import capture_inputs
from seqedit.io import file_sha256
from seqedit.paths import expand_source
from seqedit.scoring import pad_batch

log = logging.getLogger(__name__)

FORMAT = "seqedit-mom2-v1"
UNITS = ("documents", "tokens")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
TEXT_SUFFIXES = (".txt", ".jsonl")

Progress = Callable[[int, int], None]  # (done, total) in the sample unit


class StatsError(ValueError):
    """Statistics cannot be computed as configured (missing text, too few tokens, singular C)."""


class StatsCacheError(StatsError):
    """A cache file holds statistics of a different model."""


@dataclass(frozen=True)
class StatsSpec:
    """How to estimate C (an editor's `stats:` section). Defaults are the published setting: 100,000 documents,
    accumulated in float32 (kmeng01/memit hparams `mom2_dtype`)."""

    # Text files / saved-dataset folders; () = the world's held-out text on a world model (required otherwise).
    source: tuple[str, ...] = ()
    n_samples: int = 100_000  # sample size, counted in `unit` (100,000 documents as published)
    unit: str = "documents"  # documents | tokens: what n_samples counts
    dtype: str = "float32"  # accumulation and storage dtype: float32 (published) | float64
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_length: int | None = None  # tokens per document; None = the model's context size

    def __post_init__(self) -> None:
        # ~ expanded once, here: the cache key, preflight and the loaders all see the real path (seqedit.paths)
        object.__setattr__(self, "source", tuple(expand_source(s) if isinstance(s, str) else s for s in self.source))
        if self.unit not in UNITS:
            raise ValueError(f"statistics sample unit {self.unit!r} is not allowed; allowed: {', '.join(UNITS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"statistics dtype {self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if self.n_samples < 1:
            raise ValueError(f"statistics sample count must be >= 1, got {self.n_samples}")
        if self.batch_tokens < 1:
            raise ValueError(f"statistics batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"statistics max_length must be >= 1 or None, got {self.max_length}")


@dataclass(frozen=True)
class SecondMoment:
    mom2: torch.Tensor  # [d_in, d_in] E[k kᵀ] (uncentered), CPU, spec dtype
    count: int  # tokens averaged over
    n_documents: int
    layer: int
    module: str
    path: Path | None  # cache file, if any
    from_cache: bool
    seconds: float  # time to compute (0 when loaded)

    @property
    def tokens_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Text sources

Source = Any  # Path | str | datasets.Dataset


def _is_dataset(src: Source) -> bool:
    return hasattr(src, "column_names") and hasattr(src, "_fingerprint")


def check_sources(sources: Sequence[Source]) -> None:
    if not sources:
        raise StatsError(
            "no text configured for second-moment statistics: set the editor's stats.source to local .txt/.jsonl "
            "files or a folder written by datasets' save_to_disk (e.g. editor.stats.source=[/data/wiki.txt]); on a "
            "world model its held-out text is the default"
        )
    for src in sources:
        if _is_dataset(src):
            if "text" not in src.column_names:
                raise StatsError(f"dataset {src!r} has no 'text' column; columns: {src.column_names}")
            continue
        p = Path(src)
        if not p.exists():
            raise StatsError(f"statistics text {str(p)!r} not found (nothing is downloaded; give a local file)")
        if p.is_file() and p.suffix not in TEXT_SUFFIXES:
            raise StatsError(
                f"statistics text {str(p)!r}: unsupported file type {p.suffix!r}; allowed: .txt (one document per "
                "line), .jsonl (a 'text' field per line), or a folder written by datasets' save_to_disk"
            )


def source_ids(sources: Sequence[Source]) -> list[dict[str, str]]:
    """Identity of each source for the cache key: path + content hash (datasets: their fingerprint)."""
    check_sources(sources)
    out = []
    for src in sources:
        if _is_dataset(src):
            out.append({"dataset": str(getattr(src, "_fingerprint"))})
            continue
        p = Path(src).resolve()
        if p.is_dir():
            out.append({"path": str(p), "dataset": _load_dataset_dir(p)._fingerprint})
        else:
            out.append({"path": str(p), "sha256": file_sha256(p)})
    return out


def _load_dataset_dir(path: Path) -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise StatsError(f"reading {str(path)!r} needs the 'datasets' package") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
        raise StatsError(f"statistics folder {str(path)!r} is not a dataset written by save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise StatsError(f"dataset folder {str(path)!r} has splits {list(ds)}; save a single split or 'train'")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise StatsError(f"dataset folder {str(path)!r} has no 'text' column; columns: {ds.column_names}")
    return ds


def iter_documents(sources: Sequence[Source]) -> Iterator[str]:
    """Documents in order: every source in turn; empty documents are skipped."""
    check_sources(sources)
    for src in sources:
        if _is_dataset(src) or Path(src).is_dir():
            ds = src if _is_dataset(src) else _load_dataset_dir(Path(src))
            for text in ds["text"] if len(ds) < 10_000 else (row["text"] for row in ds):
                if text and text.strip():
                    yield text
            continue
        p = Path(src)
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if p.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise StatsError(f"{str(p)!r} line {lineno}: expected a JSON object with a 'text' field") from e
                else:
                    text = line.rstrip("\n")
                if text.strip():
                    yield text


# ---------------------------------------------------------------------------------------------------------------
# Model fingerprint


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().reshape(-1).contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, arch: ArchSpec, layer: int) -> str:
    """sha256 over every parameter and buffer that can change the input of `mlp_out(layer)`.

    Blocks above `layer`, the final norm, the unembedding and `mlp_out(layer)` itself are left out, so edits of the
    rewritten matrix (or of higher layers) keep the cache valid while anything that changes the keys invalidates it.
    """
    prefix = arch.layers + "."
    own = arch.mlp_out(layer) + "."
    skip = (own, arch.ln_f + ".", arch.lm_head + ".")
    h = hashlib.sha256()
    h.update(f"{arch.name}|{layer}".encode())
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(named, key=lambda kv: kv[0]):
        if name.startswith(skip):
            continue
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            if idx.isdigit() and int(idx) > layer:
                continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Computation


def _context_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def _batches(
    token_lists: Iterable[list[int]], batch_tokens: int
) -> Iterator[list[list[int]]]:
    """Group documents so that rows × longest row ≤ batch_tokens (at least one document per batch)."""
    batch: list[list[int]] = []
    width = 0
    for ids in token_lists:
        w = max(width, len(ids))
        if batch and w * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, w = [], len(ids)
        batch.append(ids)
        width = w
    if batch:
        yield batch


def _tokenised(
    tokenizer: Any, documents: Iterator[str], max_length: int, limit: int | None, chunk: int = 1024
) -> Iterator[list[list[int]]]:
    """Chunks of tokenised documents (at most `limit` documents in all), each chunk sorted by length so that
    batches carry little padding. Which documents are used depends only on their order, never on the sorting."""
    taken = 0
    while limit is None or taken < limit:
        want = chunk if limit is None else min(chunk, limit - taken)
        docs = [d for _, d in zip(range(want), documents)]
        if not docs:
            return
        taken += len(docs)
        encoded = [list(ids[:max_length]) for ids in tokenizer(docs)["input_ids"] if ids]
        # by hand: tokenizers differ in how they truncate with special tokens
        yield sorted(encoded, key=len)


@torch.no_grad()
def compute_second_moments(
    model: nn.Module,
    tokenizer: Any,
    module_names: Sequence[str],
    documents: Iterable[str],
    spec: StatsSpec,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Σ k kᵀ / count at the input of every named module over the first `spec.n_samples` documents or tokens, in
    one forward pass per batch that stops once all modules have their input. Returns ({name: C [d, d] on CPU},
    token count, document count)."""
    names = list(dict.fromkeys(module_names))
    if not names:
        raise ValueError("no modules to collect statistics for")
    modules = {n: get_module(model, n) for n in names}
    acc_dtype = DTYPES[spec.dtype]
    acc = {n: torch.zeros(in_features(m), in_features(m), dtype=acc_dtype, device=m.weight.device)
           for n, m in modules.items()}  # Σ k kᵀ per module
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = spec.max_length or _context_size(model)
    count = n_docs = 0
    target = spec.n_samples
    was_training = model.training
    model.eval()
    try:
        limit = target if spec.unit == "documents" else None
        chunks = _tokenised(tokenizer, iter(documents), max_length, limit)
        for batch in (b for chunk in chunks for b in _batches(chunk, spec.batch_tokens)):
            ids, mask = pad_batch(batch, pad)
            ids, mask = ids.to(device), mask.to(device)
            with capture_inputs(model, names, stop=True) as cap:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            n_new = int(mask.sum()) if spec.unit == "documents" else min(int(mask.sum()), target - count)
            for name in names:
                x = cap.inputs[name]
                keys = x[mask.to(x.device).bool()][:n_new].to(acc_dtype)  # [n_tokens, d], padding excluded
                acc[name].addmm_(keys.T, keys)
            count += n_new
            n_docs += len(batch)
            done = n_docs if spec.unit == "documents" else count
            if progress is not None:
                progress(done, target)
            if done >= target:
                break
    finally:
        model.train(was_training)
    if count == 0:
        raise StatsError("the statistics text holds no tokens")
    return {n: (a / count).cpu() for n, a in acc.items()}, count, n_docs


def compute_second_moment(
    model: nn.Module,
    tokenizer: Any,
    module_name: str,
    documents: Iterable[str],
    spec: StatsSpec,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, int, int]:
    """One module's (C [d, d] on CPU, token count, document count); see `compute_second_moments`."""
    moments, count, n_docs = compute_second_moments(model, tokenizer, [module_name], documents, spec, progress)
    return moments[module_name], count, n_docs


# ---------------------------------------------------------------------------------------------------------------
# Cache


def _cache_key(fingerprint: str, module_name: str, layer: int, sources: list[dict[str, str]], spec: StatsSpec,
               max_length: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "model_fingerprint": fingerprint,
        "module": module_name,
        "layer": str(layer),
        "sources": json.dumps(sources, sort_keys=True),
        "n_samples": str(spec.n_samples),
        "unit": spec.unit,
        "dtype": spec.dtype,
        "max_length": str(max_length),
    }


def cache_path(cache_dir: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    unit = "doc" if key["unit"] == "documents" else "tok"
    return Path(cache_dir) / f"mom2_{key['module']}_{key['n_samples']}{unit}_{key['dtype']}_{digest}.safetensors"


def _load_cached(path: Path, key: dict[str, str], d: int) -> tuple[torch.Tensor, int, int] | None:
    """The cached (C, count, docs), or None when the file is unusable (it is then recomputed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2 = f.get_tensor("mom2")
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged file
        log.warning("statistics cache %s is unreadable (%s); recomputing", path, e)
        return None
    if meta.get("format") == FORMAT and meta.get("model_fingerprint") not in (None, key["model_fingerprint"]):
        raise StatsCacheError(
            f"statistics cache {str(path)!r} was computed for another model (fingerprint "
            f"{meta['model_fingerprint'][:12]}…, this model {key['model_fingerprint'][:12]}…); remove the file or "
            "use another cache_dir"
        )
    mismatched = [k for k, v in key.items() if meta.get(k) != v]
    if mismatched:
        log.warning("statistics cache %s does not match (%s); recomputing", path, ", ".join(mismatched))
        return None
    if tuple(mom2.shape) != (d, d) or mom2.dtype != DTYPES[key["dtype"]] or not torch.isfinite(mom2).all():
        log.warning("statistics cache %s holds a %s %s matrix, expected %s; recomputing", path,
                    tuple(mom2.shape), mom2.dtype, (d, d))
        return None
    try:
        return mom2, int(meta["count"]), int(meta["n_documents"])
    except (KeyError, ValueError):
        log.warning("statistics cache %s lacks its counts; recomputing", path)
        return None


def _save(path: Path, mom2: torch.Tensor, key: dict[str, str], count: int, n_docs: int) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"mom2": mom2.contiguous()}, str(tmp),
              metadata={**key, "count": str(count), "n_documents": str(n_docs)})
    os.replace(tmp, path)  # atomic: a reader never sees a half-written file


def layer_second_moments(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    sources: Sequence[Source],
    *,
    spec: StatsSpec = StatsSpec(),
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[int, SecondMoment]:
    """C = E[k kᵀ] at the input of `arch.mlp_out(l)` for each layer: valid cache entries are loaded, the missing
    ones are computed together in one pass over the text (stopping after the highest layer) and saved."""
    layers = sorted(set(layers))
    sources = list(sources)
    ids = source_ids(sources)
    max_length = spec.max_length or _context_size(model)
    out: dict[int, SecondMoment] = {}
    todo: dict[int, tuple[dict[str, str], Path | None, int]] = {}
    for layer in layers:
        module_name = arch.mlp_out(layer)
        d = in_features(get_module(model, module_name))
        key = _cache_key(model_fingerprint(model, arch, layer), module_name, layer, ids, spec, max_length)
        path = cache_path(cache_dir, key) if cache_dir is not None else None
        cached = _load_cached(path, key, d) if path is not None and path.exists() else None
        if cached is not None:
            mom2, count, n_docs = cached
            out[layer] = SecondMoment(mom2, count, n_docs, layer, module_name, path, True, 0.0)
        else:
            todo[layer] = (key, path, d)
    if todo:
        names = {layer: arch.mlp_out(layer) for layer in todo}
        t0 = time.perf_counter()
        moments, count, n_docs = compute_second_moments(
            model, tokenizer, list(names.values()), iter_documents(sources), spec, progress)
        seconds = time.perf_counter() - t0
        for layer, (key, path, d) in todo.items():
            if count < d:
                raise StatsError(
                    f"second moment of {names[layer]} from {count} tokens is singular: it needs at least {d} tokens "
                    f"(the key dimension), preferably many times more; add text to {[str(s) for s in sources]} or "
                    f"raise stats.n_samples (now {spec.n_samples} {spec.unit})"
                )
            if path is not None:
                _save(path, moments[names[layer]], key, count, n_docs)
            out[layer] = SecondMoment(moments[names[layer]], count, n_docs, layer, names[layer], path, False, seconds)
    return {layer: out[layer] for layer in layers}


def layer_second_moment(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    layer: int,
    sources: Sequence[Source],
    *,
    spec: StatsSpec = StatsSpec(),
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> SecondMoment:
    """C = E[k kᵀ] at the input of `arch.mlp_out(layer)`, from the cache when a valid entry exists."""
    return layer_second_moments(model, tokenizer, arch, [layer], sources, spec=spec, cache_dir=cache_dir,
                                progress=progress)[layer]
