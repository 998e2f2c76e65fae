"""Shared test fixtures. Tests never touch the network; the development files in ../shared are used when
present (CI has them) and the tests that need them are skipped with a reason otherwise."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

SHARED_DIR = Path(os.environ.get("GPT2_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED_DIR / "data"
SHARED_TOKENIZER = SHARED_DIR / "gpt2-tokenizer"

requires_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "ids-sst-train.csv").is_file(), reason=f"development data not found at {SHARED_DATA}"
)
requires_shared_tokenizer = pytest.mark.skipif(
    not (SHARED_TOKENIZER / "vocab.json").is_file(), reason=f"GPT-2 tokenizer files not found at {SHARED_TOKENIZER}"
)


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    # A test that accidentally reaches for the hub fails fast instead of waiting on retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def random_model(size: str = "tiny"):
    """A GPT2Model with random weights, without the warning that says so."""
    from models.gpt2 import GPT2Model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2Model.from_pretrained(f"random:{size}")
