"""One map per architecture from abstract component names to module paths.

Editors and probes never spell module names themselves; they ask the `ArchSpec`. Orientation matters: GPT-2's
`Conv1D` stores W^T (shape [d_in, d_out]) while `nn.Linear` stores W (shape [d_out, d_in]); decide by module type,
never by shape (square matrices make shape tests ambiguous).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values served by this map
    layers: str  # container of transformer blocks
    layer_tmp: str  # one block (residual stream output)
    mlp_tmp: str  # whole MLP (its output is ROME's "value" site)
    mlp_in_tmp: str  # first MLP matrix (d_model -> d_ff)
    mlp_out_tmp: str  # second MLP matrix (d_ff -> d_model): the matrix ROME/MEMIT rewrite
    attn_tmp: str
    embed: str  # token embedding
    ln_f: str  # final norm before the unembedding
    lm_head: str
    n_layer_attr: str = "num_hidden_layers"

    def layer(self, i: int) -> str:
        return self.layer_tmp.format(i)

    def mlp(self, i: int) -> str:
        return self.mlp_tmp.format(i)

    def mlp_in(self, i: int) -> str:
        return self.mlp_in_tmp.format(i)

    def mlp_out(self, i: int) -> str:
        return self.mlp_out_tmp.format(i)

    def attn(self, i: int) -> str:
        return self.attn_tmp.format(i)


ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec("gpt2", ("gpt2",), "transformer.h", "transformer.h.{}", "transformer.h.{}.mlp",
             "transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn",
             "transformer.wte", "transformer.ln_f", "lm_head"),
    ArchSpec("gptj", ("gptj",), "transformer.h", "transformer.h.{}", "transformer.h.{}.mlp",
             "transformer.h.{}.mlp.fc_in", "transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn",
             "transformer.wte", "transformer.ln_f", "lm_head"),
    ArchSpec("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp",
             "gpt_neox.layers.{}.mlp.dense_h_to_4h", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
             # transformers 5 renamed GPT-NeoX's `embed_out` to `lm_head` (old checkpoints are converted on load).
             "gpt_neox.layers.{}.attention", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head"),
    # Llama-style gated MLP: "mlp_in" is up_proj; the rewritten matrix is down_proj, whose input is act(gate)*up.
    ArchSpec("llama", ("llama", "mistral", "qwen2"), "model.layers", "model.layers.{}", "model.layers.{}.mlp",
             "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn",
             "model.embed_tokens", "model.norm", "lm_head"),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def spec_for_model_type(model_type: str | None) -> ArchSpec:
    """The map serving HF `config.model_type`; lets loaders reject a model from its config before loading weights."""
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )


def arch_for(model: nn.Module) -> ArchSpec:
    return spec_for_model_type(getattr(getattr(model, "config", None), "model_type", None))


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"model has no module {name!r}") from e


def num_layers(model: nn.Module) -> int:
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise ValueError("cannot find the layer count in the model config")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (weight stored as [d_in, d_out])."""
    return type(module).__name__ == "Conv1D"


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight"


def to_param_layout(module: nn.Module, delta_linear: torch.Tensor) -> torch.Tensor:
    """Convert a Linear-convention update [d_out, d_in] to the module's stored weight layout."""
    return delta_linear.T.contiguous() if is_conv1d(module) else delta_linear


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in Linear convention [d_out, d_in] (a view; do not modify)."""
    w = module.weight
    return w.T if is_conv1d(module) else w


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
