"""Builds random `transformers` GPT-2 models and saves them in the layouts found on the hub."""
from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers", reason="transformers is a test-only dependency")


def small_hf_config(**overrides):
    fields = dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=3, n_head=4, layer_norm_epsilon=1e-5)
    fields.update(overrides)
    return transformers.GPT2Config(**fields)


def random_hf_model(config=None, seed: int = 0):
    """GPT2LMHeadModel with random weights; biases and LayerNorms randomised too, so that a mapping bug
    in any tensor shows up in the outputs."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config or small_hf_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_safetensors_with_prefix(model, directory: Path) -> Path:
    """What GPT2LMHeadModel.save_pretrained writes: model.safetensors with `transformer.` prefixed keys."""
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_bin_without_prefix(model, directory: Path) -> Path:
    """The old hub layout: pytorch_model.bin, no prefix, with the attn.bias / attn.masked_bias buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {name: t.clone() for name, t in model.transformer.state_dict().items()}
    n_pos = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, directory / "pytorch_model.bin")
    return directory
