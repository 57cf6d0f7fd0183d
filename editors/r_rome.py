"""r-ROME (Gupta et al. 2024, arXiv 2403.07175; scalable-model-editing/rebuilding-rome, its default variant).

Identical to ROME (`rome.py`) except for the keys of the update equation: the numerator and denominator use the same
template-averaged key k̄ = mean_j k_j that gives the direction u (and W k̄ + b = mean_j (W k_j + b)), so
ΔW = (v* − W k̄ − b) uᵀ / (k̄ᵀ u) with u = C⁻¹k̄/‖C⁻¹k̄‖ and W′k̄ = v*: the paper's equation with consistent keys.
This removes the small-denominator blow-ups ("disabling edits") of original ROME. Same config and stats keys as ROME.
"""
from __future__ import annotations

from typing import ClassVar

from seqedit.editors.base import register_editor
from seqedit.editors.rome import RomeConfig, RomeEditor


@register_editor("r-rome")
class RRomeEditor(RomeEditor):
    Config: ClassVar[type] = RomeConfig
    KEY_FOR_U: ClassVar[str] = "mean"
    KEY_FOR_UPDATE: ClassVar[str] = "mean"
