"""Our GPT-2 against the reference implementation (transformers), on random weights saved in the hub's
layouts: the loaded model must produce the same hidden states and logits."""
from __future__ import annotations

import pytest
import torch

from models.gpt2 import GPT2Model
from tests.fixtures.hf_reference import (
    random_hf_model,
    save_bin_without_prefix,
    save_safetensors_with_prefix,
    small_hf_config,
    transformers,
)

TOL = 1e-4


def padded_batch(vocab: int, lengths: list[int], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), length), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1  # right padding, as the course's batches are
    return ids, mask


def assert_matches_reference(ours: GPT2Model, reference, ids, mask):
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, mask)
        logits = ours.hidden_state_to_token(got["last_hidden_state"])
    for row in range(ids.shape[0]):
        real = int(mask[row].sum())  # padding positions are garbage in both implementations
        torch.testing.assert_close(
            got["last_hidden_state"][row, :real], expected.hidden_states[-1][row, :real], atol=TOL, rtol=0
        )
        torch.testing.assert_close(logits[row, :real], expected.logits[row, :real], atol=TOL, rtol=0)
        torch.testing.assert_close(got["last_token"][row], expected.hidden_states[-1][row, real - 1], atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors_with_prefix", "bin_without_prefix"])
def test_loads_hub_layouts_and_matches_reference(tmp_path, layout):
    reference = random_hf_model()
    save = save_safetensors_with_prefix if layout == "safetensors_with_prefix" else save_bin_without_prefix
    directory = save(reference, tmp_path / layout)
    expected_file = "model.safetensors" if layout == "safetensors_with_prefix" else "pytorch_model.bin"
    assert (directory / expected_file).is_file()

    ours = GPT2Model.from_pretrained(directory)
    assert not ours.training, "from_pretrained returns the model in eval mode"
    ids, mask = padded_batch(reference.config.vocab_size, [17, 9, 1, 12])
    assert_matches_reference(ours, reference, ids, mask)


@pytest.mark.slow  # 124M parameters, in both implementations
def test_matches_reference_at_full_gpt2_shape(tmp_path):
    reference = random_hf_model(transformers.GPT2Config())  # 124M: vocab 50257, 12 x 768, 12 heads
    ours = GPT2Model.from_pretrained(save_safetensors_with_prefix(reference, tmp_path))
    assert sum(p.numel() for p in ours.parameters()) == 124_439_808
    ids, mask = padded_batch(50257, [24, 15])
    assert_matches_reference(ours, reference, ids, mask)


def test_saved_model_loads_in_transformers(tmp_path):
    """save_pretrained writes the hub layout, so the reference reads our files back to the same outputs."""
    reference = random_hf_model()
    ours = GPT2Model.from_pretrained(save_safetensors_with_prefix(reference, tmp_path / "in"))
    ours.save_pretrained(tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(reference.config.vocab_size, [10, 4])
    assert_matches_reference(ours, reloaded, ids, mask)
    assert_matches_reference(GPT2Model.from_pretrained(tmp_path / "out"), reference, ids, mask)


def test_train_mode_without_dropout_matches_reference(tmp_path):
    """Without dropout (p=0) train mode is deterministic and equals eval mode in both implementations."""
    reference = random_hf_model(small_hf_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ours = GPT2Model.from_pretrained(save_safetensors_with_prefix(reference, tmp_path)).train()
    assert ours.config.dropout == 0.0
    ids, mask = padded_batch(reference.config.vocab_size, [8, 8])
    assert_matches_reference(ours, reference.train(), ids, mask)


def test_course_sanity_check(tmp_path):
    """sanity_check.py as the course runs it: GPT2Model.from_pretrained(model=..., d=..., l=..., num_heads=...), its
    right-padded batch, last_hidden_state at the real positions against transformers' GPT2Model (atol 1e-1, rtol
    1e-2; here also within TOL). Random weights of a small width with GPT-2's vocabulary, as the ids need it."""
    reference = random_hf_model(small_hf_config(vocab_size=50257, n_positions=16))
    directory = save_safetensors_with_prefix(reference, tmp_path / "gpt2-small")
    sent_ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0],
                             [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])
    att_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    openai_model = transformers.GPT2Model.from_pretrained(directory).eval()
    gpt = GPT2Model.from_pretrained(model=str(directory), d=48, l=3, num_heads=4)
    outputs = gpt(sent_ids, att_mask)
    with torch.no_grad():
        openai_outputs = openai_model(input_ids=sent_ids, attention_mask=att_mask,
                                      output_hidden_states=True).hidden_states[-1]
    mask = att_mask.unsqueeze(-1)
    ours, theirs = outputs["last_hidden_state"].detach() * mask, openai_outputs * mask
    assert torch.allclose(ours, theirs, atol=1e-1, rtol=1e-2)
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
