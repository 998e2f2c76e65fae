"""--layers auto:K: score every layer of the frozen model by how well its hidden states serve the task, and adapt
the K best. One pass of the frozen model over a sample of the data, before the method is applied.

Classification (sentiment, paraphrase): a linear probe per layer, as the DESIGN notes suggest. Logistic
regression (scikit-learn, on standardised features: the residual stream's scale grows with depth) is fitted
on the last-token hidden state of each layer's output for a sample of the training set, and the score is its
accuracy on a sample of the dev set (a held-out quarter of the training sample when dev has no labels).

Generation (sonnets), where no label exists to probe for: each layer's *gain* under the logit lens, i.e. how
much the layer lowers the frozen model's own next-token loss on the training sonnets when every hidden state
is read out through the final LayerNorm and the tied LM head: gain(l) = loss(input of l) - loss(output of l).
It is the generative analogue of the probe (the LM head is the probe the model already has, so nothing is
fitted), costs one forward pass, and ranks the layers that do the work of predicting this text. The gain
rather than the loss itself, because the loss only falls with depth, so its ranking would always be the last
layers.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from data.atomic import atomic_save
from models.gpt2 import GPT2Model, last_real_token
from models.methods import MethodConfig, auto_layer_count, method_parts
from models.tokenizer import pad_sequences
from tasks.classification import ClassificationTask
from tasks.task import Example, Task

PROBE_EXAMPLES = 512  # training examples the probe is fitted on (and at most as many dev examples it is scored on)
LENS_EXAMPLES = 64  # sonnets the logit lens reads (the whole training set has 143)
LENS_BATCH = 4  # vocabulary-sized logits per token: keep batches small


@dataclass
class LayerChoice:
    criterion: str  # what the scores are
    scores: list  # one per layer, higher is better
    chosen: list  # the K best layers, in index order
    examples: dict  # how many examples the scores used, per role

    def to_dict(self) -> dict:
        return asdict(self)


def layer_states(gpt: GPT2Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 reduce: Callable[[torch.Tensor], object]) -> list:
    """`reduce(hidden)` of the input of layer 0 (the embeddings) and of the output of every layer: n_layer + 1
    values, read with hooks during one forward pass of `gpt` (in eval mode, without gradients)."""
    values = []
    handles = [gpt.h[0].register_forward_pre_hook(lambda module, args: values.append(reduce(args[0])))]
    handles += [layer.register_forward_hook(lambda module, args, out: values.append(reduce(out))) for layer in gpt.h]
    try:
        gpt(input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return values


def sample(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    if len(examples) <= count:
        return list(examples)
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), count))]


def batches(examples: Sequence[Example], size: int, device: torch.device):
    for start in range(0, len(examples), size):
        yield pad_sequences([e.input_ids for e in examples[start:start + size]], device=device)


def last_token_features(gpt: GPT2Model, examples: Sequence[Example], batch_size: int, device) -> list[torch.Tensor]:
    """Per layer output, the (N, d) last-token hidden states of `examples`."""
    per_batch = []
    for ids, mask in batches(examples, batch_size, device):
        per_batch.append(layer_states(gpt, ids, mask, lambda h: last_real_token(h, mask).float().cpu())[1:])
    return [torch.cat(layer) for layer in zip(*per_batch)]


def probe_scores(train: Sequence[torch.Tensor], train_labels: list, dev: Sequence[torch.Tensor],
                 dev_labels: list) -> list[float]:
    """Per layer, the dev accuracy of a logistic regression fitted on that layer's training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_labels)) < 2:
        raise ValueError("--layers auto:K: the probe's training sample holds one label only; use more training "
                         "examples (--max-train-examples) or fixed --layers")
    scores = []
    for x_train, x_dev in zip(train, dev):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        probe.fit(x_train.numpy(), train_labels)
        scores.append(float(probe.score(x_dev.numpy(), dev_labels)))
    return scores


def lens_gains(gpt: GPT2Model, examples: Sequence[Example], device) -> list[float]:
    """Per layer, how much it lowers the mean next-token loss read through the final LayerNorm and the LM head."""
    sums, tokens = None, 0
    for ids, mask in batches(examples, LENS_BATCH, device):
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

        def lens_loss(hidden: torch.Tensor) -> float:
            logits = gpt.hidden_state_to_token(gpt.ln_f(hidden[:, :-1])).float()
            return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))

        losses = layer_states(gpt, ids, mask, lens_loss)
        sums = losses if sums is None else [a + b for a, b in zip(sums, losses)]
        tokens += int((targets != -100).sum())
    mean = [s / max(tokens, 1) for s in sums]
    return [before - after for before, after in zip(mean, mean[1:])]


def choose_layers(task: Task, gpt: GPT2Model, splits: dict, k: int, seed: int, device, batch_size: int = 32) -> LayerChoice:
    """Scores every layer of the frozen `gpt` for `task` on (samples of) `splits` and picks the k best (ties: the
    lower layer)."""
    return choose_layer_sets(task, gpt, splits, [k], seed, device, batch_size)[0]


@torch.no_grad()
def choose_layer_sets(task: Task, gpt: GPT2Model, splits: dict, ks: Sequence[int], seed: int, device,
                      batch_size: int = 32) -> list[LayerChoice]:
    """choose_layers for each K of `ks` from one scoring pass: the layers' scores do not depend on K."""
    n_layer = len(gpt.h)
    for k in ks:
        if k > n_layer:
            raise ValueError(f"--layers auto:{k}: the model has only {n_layer} layers")
    was_training = gpt.training
    gpt.eval()  # no dropout: the scores must not depend on the draw
    try:
        if isinstance(task, ClassificationTask):
            train = sample(splits["train"], PROBE_EXAMPLES, seed)
            dev = [e for e in splits.get("dev", []) if e.label is not None]
            if dev:
                dev = sample(dev, PROBE_EXAMPLES, seed)
            else:  # no dev labels: hold out a quarter of the training sample
                cut = max(1, len(train) // 4)
                train, dev = train[cut:], train[:cut]
            features = {name: last_token_features(gpt, part, batch_size, device) for name, part in
                        (("train", train), ("dev", dev))}
            scores = probe_scores(features["train"], [e.label for e in train], features["dev"], [e.label for e in dev])
            criterion, counts = "linear probe dev accuracy (last token)", {"train": len(train), "dev": len(dev)}
        else:
            train = sample(splits["train"], LENS_EXAMPLES, seed)
            scores = lens_gains(gpt, train, device)
            criterion, counts = "logit-lens next-token loss gain (nats/token)", {"train": len(train)}
    finally:
        gpt.train(was_training)
    ranked = sorted(range(n_layer), key=lambda layer: (-scores[layer], layer))
    return [LayerChoice(criterion, scores, sorted(ranked[:k]), counts) for k in ks]


def resolve_auto_layers(task: Task, gpt: GPT2Model, splits: dict, method: MethodConfig | list[MethodConfig],
                        seed: int, device, batch_size: int) -> tuple[MethodConfig | list[MethodConfig], list[LayerChoice]]:
    """The method (or each part of a combination) with `layers: auto:K` replaced by the chosen layers, and one
    choice per K asked for, in the order the parts ask (none for fixed layers). Parts asking for the same K share
    its choice; the layers are scored once, whatever the Ks."""
    asked = [auto_layer_count(part.layers) for part in method_parts(method)]  # K, or None for fixed layers
    ks = list(dict.fromkeys(k for k in asked if k is not None))
    choices = dict(zip(ks, choose_layer_sets(task, gpt, splits, ks, seed, device, batch_size) if ks else []))
    parts = [part if k is None else MethodConfig.from_dict({**part.to_dict(), "layers": choices[k].chosen})
             for part, k in zip(method_parts(method), asked)]
    return (parts[0] if len(parts) == 1 else parts), list(choices.values())


def plot_layer_scores(path: Path, choice: LayerChoice, title: str) -> bool:
    """A bar per layer, the chosen ones filled; False (and no file) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    layers = range(len(choice.scores))
    colours = ["tab:blue" if layer in choice.chosen else "lightgray" for layer in layers]
    ax.bar(layers, choice.scores, color=colours, edgecolor="tab:blue")
    ax.set(xlabel="layer", ylabel=choice.criterion, xticks=list(layers),
           title=f"{title}\nchosen (blue): {', '.join(map(str, choice.chosen))}")
    ax.yaxis.label.set_size("small")
    ax.title.set_size("medium")
    ax.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=120), path)
    return True
