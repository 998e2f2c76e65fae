"""--layers auto:K (tasks/layer_choice.py): on a model where one layer's output is made to carry the answer, auto:1
picks that layer (the probe for classification, the logit-lens gain for generation); the trainer resolves
auto:K before the method is applied and records the scores and a plot; the flag's errors."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from models.config import GPT2Config
from models.gpt2 import GPT2Model
from models.methods import MethodConfig
from models.peft import applied_methods, apply_method
from tasks import get_task
from tasks.cli import parse_args
from tasks.layer_choice import choose_layers
from tasks.saved_run import load_run
from tasks.task import Example
from tasks.trainer import run_training
from tests.fixtures.task_files import base_args, run_script

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
SIGNAL_LAYER, N_LAYER, VOCAB = 2, 5, 64


class Writes(nn.Module):
    """Wraps a layer: adds `signal(ids, mask)` to its output and leaves it in `seen` for the next layer to erase."""

    def __init__(self, layer, seen, signal):
        super().__init__()
        self.layer, self.seen, self.signal = layer, seen, signal

    def forward(self, hidden, ctx):
        self.seen["delta"] = self.signal(self.seen["ids"], self.seen["mask"], hidden.shape[-1])
        return self.layer(hidden, ctx) + self.seen["delta"]


class Erases(nn.Module):
    """Wraps the next layer: it sees the hidden state without the signal, so only one layer's output carries it."""

    def __init__(self, layer, seen):
        super().__init__()
        self.layer, self.seen = layer, seen

    def forward(self, hidden, ctx):
        return self.layer(hidden - self.seen["delta"], ctx)


def model_with_signal(signal) -> GPT2Model:
    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=N_LAYER, n_head=4, dropout=0.0))
    seen = {}
    gpt.register_forward_pre_hook(lambda module, args: seen.update(ids=args[0], mask=args[1]))
    gpt.h[SIGNAL_LAYER] = Writes(gpt.h[SIGNAL_LAYER], seen, signal)
    gpt.h[SIGNAL_LAYER + 1] = Erases(gpt.h[SIGNAL_LAYER + 1], seen)
    return gpt.requires_grad_(False)


def random_examples(count: int, seed: int, labelled: bool = True) -> list[Example]:
    rng = random.Random(seed)
    return [Example(id=f"{seed}-{i}", input_ids=[rng.randrange(VOCAB) for _ in range(rng.randint(3, 8))],
                    label=rng.randint(0, 1) if labelled else None) for i in range(count)]


def test_the_probe_picks_the_one_layer_whose_output_encodes_the_label():
    train, dev = random_examples(80, seed=1), random_examples(60, seed=2)
    # The labels are random, so no layer can read them off the tokens; the signal layer is told them.
    labels = {tuple(e.input_ids): e.label for e in train + dev}
    direction = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)

    def label_signal(ids, mask, width):
        rows = [labels[tuple(row[m.bool()].tolist())] for row, m in zip(ids, mask)]
        sign = torch.tensor(rows, dtype=torch.float32) * 2 - 1
        return 8.0 * sign[:, None, None] * direction

    gpt = model_with_signal(label_signal)
    choice = choose_layers(get_task("sst"), gpt, {"train": train, "dev": dev}, k=1, seed=0, device="cpu", batch_size=16)
    assert choice.chosen == [SIGNAL_LAYER] and len(choice.scores) == N_LAYER
    assert choice.scores[SIGNAL_LAYER] == 1.0
    assert max(s for i, s in enumerate(choice.scores) if i != SIGNAL_LAYER) < 0.8  # chance is 0.5
    assert choice.examples == {"train": 80, "dev": 60} and "probe" in choice.criterion


def test_the_logit_lens_picks_the_one_layer_that_predicts_the_next_token():
    gpt = model_with_signal(None)

    def next_token_signal(ids, mask, width):  # the next token's embedding, at every position but the last
        following = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        delta = gpt.wte.weight[following] * 20.0
        delta[:, -1] = 0
        return delta

    gpt.h[SIGNAL_LAYER].signal = next_token_signal
    sonnets = random_examples(12, seed=4, labelled=False)
    choice = choose_layers(get_task("sonnet"), gpt, {"train": sonnets}, k=1, seed=0, device="cpu")
    assert choice.chosen == [SIGNAL_LAYER] and choice.examples == {"train": 12}
    assert choice.scores[SIGNAL_LAYER] > 0.5 and choice.scores[SIGNAL_LAYER + 1] < 0  # the erasing layer loses it


def test_auto_layers_go_through_training_into_the_log_and_the_adapter(tmp_path, task_files):
    config = parse_args("sst", base_args(tmp_path, task_files, layers="auto:1", max_train_examples=16,
                                         max_eval_examples=8))
    assert config.method.layers == "auto:1"
    run_training("sst", config)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    choice = log["layer_choice"]
    assert len(choice["scores"]) == 2 and len(choice["chosen"]) == 1  # random:tiny has two layers
    assert all(0 <= s <= 1 for s in choice["scores"]) and choice["examples"] == {"train": 16, "dev": 8}
    assert choice["chosen"][0] == max(range(2), key=lambda i: (choice["scores"][i], -i))
    assert (tmp_path / "run" / "layer_scores.png").read_bytes()[:4] == b"\x89PNG" and choice["plot"].endswith(".png")
    assert log["config"]["method"]["layers"] == "auto:1"  # the request; the adapter holds what was chosen
    adapter = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert [m["layers"] for m in adapter["methods"]] == [choice["chosen"]]
    reloaded = load_run(tmp_path / "run")  # rebuilt on the chosen layers, not on the unresolved request
    assert [m.layers for m in applied_methods(reloaded.gpt)] == [choice["chosen"]]


def test_parts_asking_for_different_ks_each_get_their_own_layers_and_line(tmp_path, task_files):
    args = base_args(tmp_path, task_files, method="lora+loreft", layers="auto:1", max_train_examples=16,
                     max_eval_examples=8) + ["--loreft.layers", "auto:2"]
    code, out, err = run_script("sentiment", args)
    assert code == 0, err
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    choice = log["layer_choice"]
    assert choice["chosen_by_k"] == {"1": choice["chosen"], "2": [0, 1]} and len(choice["chosen"]) == 1
    assert [line.split(":")[1] for line in out.splitlines() if "--layers auto:" in line] == ["1", "2"]
    adapter = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert [m["layers"] for m in adapter["methods"]] == [choice["chosen"], [0, 1]]


def test_auto_layer_errors(tmp_path, task_files):
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, layers="auto:0"))
    assert code == 2 and "--layers must be layer indices or auto:K with K >= 1, got 'auto:0'" in err
    code, _, err = run_script("sentiment", base_args(tmp_path / "b", task_files, layers="auto:3", max_train_examples=8))
    assert code == 1 and "--layers auto:3: the model has only 2 layers" in err
    with pytest.raises(ValueError, match="must be chosen before the method is applied"):
        apply_method(model_with_signal(None), MethodConfig("lora", layers="auto:2"))
