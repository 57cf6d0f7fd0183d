"""World configuration: every knob of the synthetic world (content, corpus design, tokenizer, model, training).

A `WorldConfig` fully determines a world: its hash names the cache directory, so any change of a field (or of
`WORLD_FORMAT_VERSION`, bumped whenever generator/training code changes what a config produces) builds a new world.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Bump when the generator, corpus or training code changes the world a given config produces.
WORLD_FORMAT_VERSION = 4

CORPUS_MODES = ("sentences", "biography")


@dataclass(frozen=True)
class CorpusDesign:
    """How the training text is written from the facts. A later issue iterates on this, so keep it declarative."""

    # "sentences": one sentence per fact; "biography": one row per subject with all its facts.
    mode: str = "sentences"
    # Sequences per fact ("sentences") or rows per subject ("biography") in each epoch.
    variants_per_epoch: int = 1
    # Draw fresh templates/orderings every epoch. With fixed variants the model memorises whole rows and recall on
    # context-free prompts stalls (environment notes: 0.6 vs 0.97).
    regenerate_each_epoch: bool = True
    # Template styles used in training: "relation_first" ("The capital of {} is") and/or "subject_first" ("{}'s ...").
    template_styles: tuple[str, ...] = ("relation_first", "subject_first")
    # If True, only two templates per relation are trained on (edit prompts come from them) and paraphrase prompts
    # use the others, so paraphrase recall measures generalisation to unseen phrasings.
    holdout_paraphrase_templates: bool = False
    # "biography" mode: shuffle the order of a subject's facts inside each row.
    shuffle_biography: bool = True
    # Also write each fact attribute-first once per epoch ("Lumumi chess is its national sport."), so the subject's
    # last token must predict an attribute before any relation word (env notes: raises the subject-position share).
    attribute_first: bool = False
    # Join 1..max_pack shuffled fact texts (sentences or rows) into each training document; skill lines stay alone.
    # With 1, every fact sentence starts right after BOS at a fixed position, and the prompts ROME-style editors
    # prefix with other text are out of distribution (tiny world: r-ROME efficacy ~0.3 with 1, ~0.55 with 2,
    # ~0.85 with 3, at 22 / 36 / 47 s build time).
    max_pack: int = 1
    # Skill lines per epoch (arithmetic: all training pairs are always included once; these add repeats).
    arithmetic_repeats: int = 1
    ordering_lines_per_epoch: int = 200

    def __post_init__(self) -> None:
        if self.mode not in CORPUS_MODES:
            raise ValueError(f"CorpusDesign.mode={self.mode!r}; allowed: {', '.join(CORPUS_MODES)}")
        bad = [s for s in self.template_styles if s not in ("relation_first", "subject_first")]
        if bad or not self.template_styles:
            raise ValueError(
                f"CorpusDesign.template_styles={self.template_styles!r}; allowed: a non-empty subset of "
                "('relation_first', 'subject_first')"
            )
        if self.max_pack < 1:
            raise ValueError(f"CorpusDesign.max_pack={self.max_pack}; must be >= 1")
        if self.variants_per_epoch < 1:
            raise ValueError(f"CorpusDesign.variants_per_epoch={self.variants_per_epoch}; must be >= 1")


@dataclass(frozen=True)
class WorldConfig:
    """All knobs of a world. `name` is the cache-dir prefix (the preset name for presets)."""

    name: str = "custom"
    seed: int = 0
    # --- world content
    n_subjects: int = 300
    # Relative frequency of each subject kind (kinds are defined in generator.KINDS).
    kind_weights: tuple[tuple[str, float], ...] = (
        ("person", 0.40), ("city", 0.20), ("country", 0.15), ("company", 0.15), ("band", 0.10),
    )
    relations_per_subject: int = 4  # capped by how many relations the subject's kind has
    mc_subject_fraction: float = 0.2  # subjects whose facts are learned but never edit records (facts_mc)
    n_neighborhood: int = 10
    n_attribute: int = 10
    n_generation: int = 4
    # --- skills
    arithmetic_max: int = 15  # operands 0..arithmetic_max
    arithmetic_heldout_fraction: float = 0.33  # of unordered pairs a<b; one orientation is held out
    ordering_min_len: int = 3
    ordering_max_len: int = 4
    ordering_heldout_mod: int = 8  # sequences whose stable hash % mod == 0 are held out of training
    n_ordering_mc: int = 120
    heldout_min_tokens: int = 6000
    # --- corpus
    corpus: CorpusDesign = field(default_factory=CorpusDesign)
    # --- tokenizer (small vocab so made-up names split into several tokens)
    # Upper bound: merges stop once no pair occurs min_frequency times (about 1,200-1,250 tokens here). Names split into
    # syllables by construction of the tokenizer corpus, not by a small vocabulary, so objects can be single tokens.
    vocab_size: int = 1500
    min_frequency: int = 3
    # --- model
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    n_inner: int | None = None  # MLP width; None = 4 * n_embd (GPT-2). The MLP input is the key space ROME edits.
    # --- training
    epochs: int = 80
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Intra-op threads while building (restored afterwards); None leaves torch's setting alone. One thread: these
    # models are too small to gain from more, oversubscribed shared cores made 2 threads 5-20x slower per step in
    # trials, and a fixed count keeps the float reductions, hence the weights, reproducible.
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.n_subjects < 10:
            raise ValueError(f"WorldConfig.n_subjects={self.n_subjects}; need at least 10")
        if self.n_embd % self.n_head:
            raise ValueError(f"WorldConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.mc_subject_fraction < 1.0:
            raise ValueError(f"WorldConfig.mc_subject_fraction={self.mc_subject_fraction}; must be in [0, 1)")
        if self.arithmetic_max < 3:
            raise ValueError(f"WorldConfig.arithmetic_max={self.arithmetic_max}; must be >= 3")
        if not 2 <= self.ordering_min_len <= self.ordering_max_len:
            raise ValueError(
                f"WorldConfig.ordering_min_len/max_len={self.ordering_min_len}/{self.ordering_max_len}; "
                "need 2 <= min <= max"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {unknown}; allowed: {sorted(names)}")
        kw = dict(data)
        if "corpus" in kw and isinstance(kw["corpus"], Mapping):
            c = dict(kw["corpus"])
            c_names = {f.name for f in dataclasses.fields(CorpusDesign)}
            bad = sorted(set(c) - c_names)
            if bad:
                raise ValueError(f"unknown CorpusDesign keys {bad}; allowed: {sorted(c_names)}")
            if "template_styles" in c:
                c["template_styles"] = tuple(c["template_styles"])
            kw["corpus"] = CorpusDesign(**c)
        if "kind_weights" in kw:
            kw["kind_weights"] = tuple((str(k), float(w)) for k, w in kw["kind_weights"])
        return cls(**kw)

    def config_hash(self) -> str:
        """12 hex digits identifying this world (config + format version)."""
        blob = json.dumps({"format": WORLD_FORMAT_VERSION, **self.to_dict()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


PRESETS: dict[str, WorldConfig] = {
    # For tests: about 45 s on one core. Packed fact documents (max_pack=3) make prompts with preceding context
    # in-distribution: single r-ROME edits at layer 0 went from about 0.3 to 0.85 efficacy in trials.
    "tiny": WorldConfig(
        name="tiny", n_subjects=120, relations_per_subject=3, n_layer=2, n_embd=64, n_head=4, lr=6e-3,
        epochs=80, batch_size=24, arithmetic_max=9, arithmetic_heldout_fraction=0.5, ordering_max_len=3,
        n_ordering_mc=80, corpus=CorpusDesign(max_pack=3, ordering_lines_per_epoch=200),
    ),
    # Default for runs: 4 layers x 128, 2,800 facts (2,380 edit records), about 6.5 minutes on 2 free cores. Chosen by
    # the design sweep in bench/world_variants.json (issue [world]): attribute-first sentences ("{s} {object} is its
    # {relation}.") make the subject's last token predict its attributes before any relation word, which raised the
    # gradient share at the subject's last token and single r-ROME efficacy over plain sentences (GPU-built sweep,
    # 80 edits: 0.59 -> 0.93; this CPU build: 0.86 on 100 edits, bench/world_gates.py).
    "small": WorldConfig(
        name="small", n_subjects=560, relations_per_subject=5, mc_subject_fraction=0.15, lr=5e-3, epochs=45,
        # 2 threads: 1.7x faster than 1 on an idle 2-core machine (the first `seqedit run` builds it alone).
        batch_size=32, torch_threads=2,
        corpus=CorpusDesign(max_pack=3, ordering_lines_per_epoch=300, attribute_first=True),
    ),
}
# small with a 1,024-wide MLP (the key space rank-one editors write into): the interference of one edit with other
# subjects' keys fell from 0.038 to 0.024 (median |u_i.k_j|/|u_i.k_i|), and sequential r-ROME kept unedited
# recall above 80% of its start for 150-175 edits instead of 26-50. 563 s to build on 2 free cores.
PRESETS["medium"] = dataclasses.replace(PRESETS["small"], name="medium", n_inner=1024)
# The shipped default world (issue [world-ship]): small's corpus design with a 2,048-wide MLP (the rank-one
# interference 1/sqrt(d_ff) that ended small's and medium's gradual phase after < 50 and ~175 edits) and 1,200
# subjects (5,100 edit records: 5,000-edit runs without re-editing a fact). Built once and shipped as package data
# (seqedit/world/shipped/), so `world:standard` loads instantly and every user gets the same weights; the held-out
# text is 10x the key dimension in tokens (enough for C, arXiv 2506.04226).
PRESETS["standard"] = dataclasses.replace(
    PRESETS["small"], name="standard", n_inner=2048, n_subjects=1200, heldout_min_tokens=20480)


def get_preset(name: str) -> WorldConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown world preset {name!r}; allowed: {', '.join(sorted(PRESETS))}") from None
