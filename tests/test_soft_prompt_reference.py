"""prompt and prefix against peft (a test-only dependency) on transformers' GPT-2, built from the same random
weights, with the same virtual-token parameters set on both: the logits at the real positions agree in fp32.

Position convention (ours and peft's): the n virtual tokens take positions 0..n-1 and the real tokens follow at
n, n+1, ...; with prompt tuning the virtual embeddings get position embeddings 0..n-1 like any token. peft leaves
position ids to transformers, which counts every column, padding included, so the two agree on right-padded
batches (the course's); on left padding ours still counts real tokens only (each row as when alone, tested in
test_soft_prompts.py), transformers' does not, so left padding is not compared here.
"""
from __future__ import annotations

import pytest
import torch

from models.gpt2 import GPT2Model
from models.peft import MethodConfig, apply_method
from tests.fixtures.hf_reference import random_hf_model, save_safetensors_with_prefix
from tests.fixtures.peft import right_padded

peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
TOL = 1e-5
N_VIRTUAL = 5


def same_weights(tmp_path):
    reference = random_hf_model()
    ours = GPT2Model.from_pretrained(save_safetensors_with_prefix(reference, tmp_path / "base"))
    return reference, ours


def assert_same_logits_at_real_tokens(ours, theirs, ids, mask, virtual_columns: int):
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits[:, virtual_columns:]
        got = ours.hidden_state_to_token(ours(ids, mask)["last_hidden_state"])
    assert got.shape == expected.shape
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        torch.testing.assert_close(got[row, real], expected[row, real], atol=TOL, rtol=0)


def test_prompt_tuning_matches_peft(tmp_path):
    reference, ours = same_weights(tmp_path)
    apply_method(ours, MethodConfig("prompt", num_virtual_tokens=N_VIRTUAL))
    theirs = peft.get_peft_model(reference, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        ours.virtual_tokens.embeddings.normal_(0, 0.5)
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.virtual_tokens.embeddings)
    ids, mask = right_padded([9, 4, 1], vocab=reference.config.vocab_size, seed=3)
    assert_same_logits_at_real_tokens(ours, theirs.eval(), ids, mask, virtual_columns=N_VIRTUAL)


@pytest.mark.parametrize("projection", [None, 16], ids=["plain", "projection"])
def test_prefix_tuning_matches_peft(tmp_path, projection):
    reference, ours = same_weights(tmp_path)
    apply_method(ours, MethodConfig("prefix", num_virtual_tokens=N_VIRTUAL, prefix_projection=projection))
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                     prefix_projection=projection is not None, encoder_hidden_size=projection or 1)
    theirs = peft.get_peft_model(reference, config)
    encoder, part = theirs.prompt_encoder["default"], ours.virtual_tokens
    with torch.no_grad():
        if projection is None:
            part.prefix.normal_(0, 1.0)
            # ours (n_layer, 2, n_head, n, head_dim) -> peft's (n, 2 x n_layer x d): layer by layer, key then value.
            encoder.embedding.weight.copy_(part.prefix.permute(3, 0, 1, 2, 4).reshape(N_VIRTUAL, -1))
        else:
            for param in part.parameters():
                param.normal_(0, 0.5)
            encoder.embedding.weight.copy_(part.embeddings)
            encoder.transform.load_state_dict(part.projection.state_dict())
    ids, mask = right_padded([9, 4, 1], vocab=reference.config.vocab_size, seed=3)
    assert_same_logits_at_real_tokens(ours, theirs.eval(), ids, mask, virtual_columns=0)
