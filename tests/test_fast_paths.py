"""A shortcut that must not change results: the last-token path (models/gpt2.py, used by the classification
head) that trains last-position interventions without recording gradients for the tokens before them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.gpt2 import GPT2Model, left_align
from models.peft import MethodConfig, apply_method
from models.tokenizer import pad_sequences as pad
from tasks.classification import LastTokenClassifier
from tests.fixtures.models import random_model

LENGTHS = (9, 5, 1, 7, 2)  # a padded batch, one row shorter than every k below

SUFFIX_METHODS = {  # method -> the k of its last-k positions
    "loreft-l1-tied": (MethodConfig("loreft", rank=4, positions="l1"), 1),
    "loreft-l2-tied": (MethodConfig("loreft", rank=4, positions="l2"), 2),
    "loreft-l3-untied": (MethodConfig("loreft", rank=4, positions="l3", tie_positions=False), 3),
    "noreft-l1-both-components": (MethodConfig("noreft", rank=4, positions="l1", components=("attention", "ffn")), 1),
    "direft-l2-one-layer": (MethodConfig("direft", rank=2, positions="l2", activation="tanh", layers=[1]), 2),
}
PREFIX_METHODS = {  # trainable parameters act before the last prompt tokens: the plain path is the only one
    "loreft-f1+l1": MethodConfig("loreft", rank=4, positions="f1+l1"),
    "reft-all": MethodConfig("reft", rank=4),
    "lora": MethodConfig("lora", rank=4),
    "bitfit": MethodConfig("bitfit"),
    "layernorm": MethodConfig("layernorm"),
    "full": MethodConfig("full"),
}


def classifier(*configs: MethodConfig, seed: int = 0) -> LastTokenClassifier:
    torch.manual_seed(seed)
    gpt = random_model("tiny").set_dropout(0.0)
    for config in configs:
        apply_method(gpt, copy.deepcopy(config))
    model = LastTokenClassifier(gpt, num_labels=3).train()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the identity initialisation, so the interventions matter
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad and param.dim() > 0 and param.numel() < 10_000:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def padded_batch(side: str = "right"):
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in LENGTHS]
    ids, mask = pad(rows)
    if side == "left":
        ids, mask = left_align(ids, mask)
    return ids, mask, torch.tensor([0, 1, 2, 1, 0])


def logits_and_grads(model: LastTokenClassifier, plain: bool, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    logits = model.head(model.gpt(ids, mask)["last_token"].float()) if plain else model(ids, mask)
    F.cross_entropy(logits, labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def count_suffix_calls(monkeypatch, gpt: GPT2Model) -> list:
    calls = []
    original = gpt.forward_trainable_suffix

    def spy(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(gpt, "forward_trainable_suffix", spy)
    return calls


# ------------------------------------------------------------------------------------------ last-token path
def test_left_align_moves_every_last_real_token_to_the_last_column():
    ids, mask, _ = padded_batch("left")
    assert mask[:, -1].all() and mask.sum(1).tolist() == list(LENGTHS)
    assert ids[1, -5:].tolist() == padded_batch("right")[0][1, :5].tolist()
    again = left_align(ids, mask)
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)


@pytest.mark.parametrize("name", SUFFIX_METHODS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_trainable_suffix_path_equals_the_plain_path(monkeypatch, name, side):
    config, k = SUFFIX_METHODS[name]
    model = classifier(config)
    assert model.gpt.trainable_suffix_length() == k
    ids, mask, labels = padded_batch(side)
    plain_logits, plain_grads = logits_and_grads(model, True, ids, mask, labels)
    calls = count_suffix_calls(monkeypatch, model.gpt)
    fast_logits, fast_grads = logits_and_grads(model, False, ids, mask, labels)
    assert calls == [k]
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == plain_grads.keys() and any(n.startswith("gpt.") for n in fast_grads)
    for param_name, plain in plain_grads.items():
        error = (fast_grads[param_name] - plain).norm() / plain.norm().clamp(min=1e-12)
        assert error < 1e-5, f"{param_name}: relative gradient error {error:.2e}"


def test_two_adapters_use_the_larger_suffix(monkeypatch):
    model = classifier(MethodConfig("loreft", rank=2, positions="l1", name="a"),
                       MethodConfig("direft", rank=2, positions="l2", name="b"))
    assert model.gpt.trainable_suffix_length() == 2
    ids, mask, labels = padded_batch()
    plain_logits, plain_grads = logits_and_grads(model, True, ids, mask, labels)
    calls = count_suffix_calls(monkeypatch, model.gpt)
    fast_logits, fast_grads = logits_and_grads(model, False, ids, mask, labels)
    assert calls == [2]
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for param_name, plain in plain_grads.items():
        torch.testing.assert_close(fast_grads[param_name], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_methods_training_earlier_tokens_take_the_plain_path(monkeypatch, name):
    model = classifier(PREFIX_METHODS[name])
    assert model.gpt.trainable_suffix_length() is None
    calls = count_suffix_calls(monkeypatch, model.gpt)
    ids, mask, labels = padded_batch()
    plain_logits, _ = logits_and_grads(model, True, ids, mask, labels)
    logits, _ = logits_and_grads(model, False, ids, mask, labels)
    assert calls == []
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)


def test_the_plain_path_serves_inference_frozen_models_and_short_batches(monkeypatch):
    model = classifier(MethodConfig("loreft", rank=4, positions="l2"))
    calls = count_suffix_calls(monkeypatch, model.gpt)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        model(ids, mask)  # evaluation: nothing to save
    model(ids[:, :2], mask[:, :2])  # every column is among the last k
    assert calls == []
    frozen = classifier(MethodConfig("last-linear-layer"))  # only the head trains: no gradient enters GPT-2
    assert frozen.gpt.trainable_suffix_length() is None
    model.gpt.requires_grad_(False)
    assert model.gpt.trainable_suffix_length() is None


def test_trainable_suffix_path_under_bf16_matches_the_plain_path():
    model = classifier(MethodConfig("loreft", rank=4, positions="l1"))
    model.gpt.set_precision("bf16")
    ids, mask, labels = padded_batch()
    plain_logits, plain_grads = logits_and_grads(model, True, ids, mask, labels)
    fast_logits, fast_grads = logits_and_grads(model, False, ids, mask, labels)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0.05, atol=0.05)
    for param_name, plain in plain_grads.items():
        assert torch.isfinite(fast_grads[param_name]).all()
        cosine = F.cosine_similarity(fast_grads[param_name].flatten(), plain.flatten(), dim=0)
        assert cosine > 0.99, f"{param_name}: cosine {cosine:.4f}"
