"""tasks.classification: the last-token classifier reads each row's last real token of a padded batch."""
from __future__ import annotations

import pytest
import torch

from tasks.classification import LastTokenClassifier
from tests.fixtures.models import random_model

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


def test_last_token_classifier_reads_each_rows_last_real_token():
    torch.manual_seed(0)
    model = LastTokenClassifier(random_model("tiny"), 3).eval()
    ids = torch.randint(0, 1000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        batched = model(ids, mask)
        alone = model(ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(batched[1:], alone, rtol=1e-5, atol=1e-5)
