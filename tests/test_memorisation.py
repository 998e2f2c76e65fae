"""tasks/memorisation.py, the memorisation loop the learning tests and bench/pretrain_compare.py share: it counts
the leading tokens greedy decoding recovers and stops once the text is reproduced."""
from __future__ import annotations

import pytest
import torch

from models.config import GPT2Config
from models.gpt2 import GPT2Model
from tasks.memorisation import leading_matches, memorise, text_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_leading_matches_counts_the_shared_start():
    assert leading_matches([1, 2, 3], [1, 2, 4]) == 2
    assert leading_matches([5], [1, 2]) == 0
    assert leading_matches([1, 2], [1, 2, 3]) == 2 and leading_matches([1, 2, 3], [1, 2, 3]) == 3


def test_a_trainable_model_memorises_a_short_text_and_stops_early():
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2, dropout=0.0))
    text = [3, 9, 1, 14, 7, 7]
    with torch.no_grad():
        before = text_loss(model.eval(), [0], text).item()
    assert before == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.3)  # near uniform at GPT-2's init
    outcome = memorise(model, [0], text, steps=400, lr=3e-2, check_every=5)
    assert outcome.exact and outcome.recovered == 6 and outcome.produced == text
    assert outcome.steps < 400 and outcome.steps % 5 == 0  # stopped at the first check that reproduced it
    assert outcome.final_loss < 0.5


def test_an_empty_prompt_or_text_is_refused():
    model = GPT2Model(GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="at least one token"):
        memorise(model, [], [1], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="at least one token"):
        memorise(model, [0], [], steps=1, lr=1e-3)
