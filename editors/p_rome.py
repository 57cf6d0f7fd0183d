"""p-ROME (Gupta et al. 2024, arXiv 2403.07175; rebuilding-rome with original_implementation=False,
enable_prompt_keys=True): prefix-free keys.

Like ROME (`rome.py`) but every key is the bare-prompt key k_raw: u = C⁻¹k_raw/‖C⁻¹k_raw‖ and
ΔW = (v* − W k_raw − b) uᵀ / (k_rawᵀ u). v* is still optimised over the context-prefixed prompts. Key computation
needs one prompt instead of all templates. Same config and stats keys as ROME.
"""
from __future__ import annotations

from typing import ClassVar

from seqedit.editors.base import register_editor
from seqedit.editors.rome import RomeConfig, RomeEditor


@register_editor("p-rome")
class PRomeEditor(RomeEditor):
    Config: ClassVar[type] = RomeConfig
    KEY_FOR_U: ClassVar[str] = "raw"
    KEY_FOR_UPDATE: ClassVar[str] = "raw"
