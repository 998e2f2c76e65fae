"""Pretraining speed of candidate shapes: a few training steps each (tasks/pretrain.py's loss and optimizer, random
tokens), so that the --steps of a pretraining run can be sized to a time budget on this machine.

    python bench/pretrain_speed.py                      # the candidates below, 3 timed steps each
    python bench/pretrain_speed.py --minutes 20 --shapes 128x4x256 --precisions fp32,bf16

Prints tokens/s per shape and precision, and the --steps that fill --minutes at --batch-size blocks per step.
One process, nothing else should run meanwhile: on a loaded machine the figures say little.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: models/, tasks/

import torch  # noqa: E402

from models.config import GPT2Config  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from tasks.pretrain import lm_loss  # noqa: E402
from tasks.trainer import build_optimizer  # noqa: E402


def measure(n_embd: int, n_layer: int, context: int, batch: int, precision: str, steps: int) -> float:
    """Training tokens per second over `steps` steps, after one warm-up step."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=context)
    model = GPT2Model(config).train().set_precision(precision)
    optimizer = build_optimizer(model, 1e-3, 0.1)
    blocks = torch.randint(0, config.vocab_size, (batch, context))
    seconds = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        lm_loss(model, blocks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates and warms up
            seconds += time.perf_counter() - start
    return steps * batch * (context - 1) / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x4x256,128x6x256,256x4x256,128x4x128",
                        help="n_embd x n_layer x context, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(f"{torch.get_num_threads()} threads; {args.steps} timed steps of {args.batch_size} blocks each")
    for shape in args.shapes.split(","):
        n_embd, n_layer, context = (int(x) for x in shape.split("x"))
        for precision in args.precisions.split(","):
            rate = measure(n_embd, n_layer, context, args.batch_size, precision, args.steps)
            steps = rate * 60 * args.minutes / (args.batch_size * (context - 1))
            print(f"n_embd {n_embd}, {n_layer} layers, context {context}, {precision}: {rate:,.0f} tokens/s; "
                  f"{args.minutes:g} minutes = about {steps:,.0f} steps of {args.batch_size} blocks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
