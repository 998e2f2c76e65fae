"""The ReFT paper's memorisation test: train what is trainable in a model (an adapter on a frozen GPT-2) until
greedy decoding continues a fixed prompt with a fixed text, and count how much of the text it recovers.

One loop serves the tests (tests/test_peft_learning.py, tests/test_pretrain_memorisation.py) and the bench
(bench/pretrain_compare.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from models.generation import SamplingConfig, generate


@dataclass
class Memorised:
    produced: list[int]  # the last greedy continuation decoded
    recovered: int  # the most leading tokens of the text any check reproduced
    steps: int  # optimizer steps run
    final_loss: float
    length: int  # tokens in the text

    @property
    def exact(self) -> bool:
        return self.recovered == self.length


def leading_matches(produced: Sequence[int], target: Sequence[int]) -> int:
    """How many tokens `produced` and `target` share from the start."""
    return next((i for i, (a, b) in enumerate(zip(produced, target)) if a != b), min(len(produced), len(target)))


def text_loss(model, prompt: Sequence[int], target: Sequence[int]) -> torch.Tensor:
    """The mean next-token loss over `target` after `prompt` (in the caller's grad mode and train/eval mode). The
    prompt's positions are what generation marks as the prompt, so interventions at first/last prompt positions
    act on the same tokens here and in decoding."""
    prompt, target = list(prompt), list(target)
    device = model.wte.weight.device
    sequence = torch.tensor([prompt + target[:-1]], device=device)
    prompt_mask = torch.arange(sequence.shape[1], device=device)[None] < len(prompt)
    hidden = model(sequence, prompt_mask=prompt_mask)["last_hidden_state"][0, len(prompt) - 1:]
    return F.cross_entropy(model.hidden_state_to_token(hidden).float(), torch.tensor(target, device=device))


def memorise(model, prompt: Sequence[int], target: Sequence[int], steps: int, lr: float,
             check_every: int = 25) -> Memorised:
    """Adam on the model's trainable parameters with the next-token loss over `target` after `prompt`; every
    `check_every` steps (and at the last) greedy decoding from the prompt is compared with the target, and
    training stops once it reproduces it exactly (the loss is `text_loss`)."""
    prompt, target = list(prompt), list(target)
    if not prompt or not target:
        raise ValueError("memorise: the prompt and the text need at least one token each")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sampling = SamplingConfig(max_new_tokens=len(target))
    produced, best, loss, step = [], 0, torch.tensor(float("nan")), 0
    for step in range(1, steps + 1):
        model.train()
        loss = text_loss(model, prompt, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % check_every == 0 or step == steps:
            produced = generate(model, [prompt], sampling)[0]
            best = max(best, leading_matches(produced, target))
            if best == len(target):
                break
    return Memorised(produced, best, step, loss.item(), len(target))
