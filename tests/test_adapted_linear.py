"""modules.adapted_linear: every weight-space method (LoRA, DoRA, (IA)^3) merges into the weights with the same
outputs, and unmerging restores the weights and biases bit for bit; a merged model refuses to train."""
from __future__ import annotations

import pytest
import torch

from models.peft import set_lora_merged
from modules.adapted_linear import AdaptedLinear
from tests.fixtures.peft import ADAPTING, fresh, perturb_trainable, right_padded

MERGEABLE = [name for name, config in ADAPTING.items()
             if any(isinstance(module, AdaptedLinear) for module in fresh(config).modules())]


def test_every_weight_update_method_is_mergeable():
    assert {ADAPTING[name].method for name in MERGEABLE} == {"lora", "dora", "ia3"}


@pytest.mark.parametrize("name", MERGEABLE)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_merge_equals_unmerged_and_unmerge_restores_weights(name, precision):
    model = fresh(ADAPTING[name]).eval()
    perturb_trainable(model, scale=0.2)
    ids, mask = right_padded([8, 3])
    with torch.no_grad():
        exact = model(ids, mask)["last_hidden_state"]
    model.set_precision(precision)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(ids, mask)["last_hidden_state"]
        set_lora_merged(model, True)
        merged = model(ids, mask)["last_hidden_state"]
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
        assert changed and all(k.endswith(("weight", "bias")) and ".layer." in k for k in changed)
        set_lora_merged(model, False)
    if precision == "fp32":
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    else:  # bf16 rounds the merged weight to 8 bits of mantissa: as far from fp32 as bf16 is without merging
        error, merged_error = (unmerged - exact).abs().mean(), (merged - exact).abs().mean()
        assert merged_error < 1.5 * error, (merged_error, error)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    set_lora_merged(model, True)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(ids, mask)
