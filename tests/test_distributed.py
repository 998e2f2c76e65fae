"""tasks.distributed: sharding undone by interleave, and more than one process: `torchrun --nproc-per-node 2`
with gloo on the CPU reaches the weights one process reaches with the same global batches, within float
tolerance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tasks import get_task
from tasks.checkpoint import checkpoint_path
from tasks.cli import parse_args
from tasks.distributed import Distributed, interleave
from tasks.trainer import Trainer
from tests.fixtures.task_files import base_args, run_script

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
requires_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                   reason="torch built without gloo")


def test_interleave_undoes_sharding():
    items = list(range(11))
    shares = [Distributed(rank, 3).shard(items) for rank in range(3)]
    assert shares[1] == [1, 4, 7, 10]
    assert interleave(shares) == items


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("method", ["full", "ptuning", "prefix", "dora", "ia3", "lobireft", "lora+loreft"])  # virtual tokens, keys
# and values in front, weight updates with a norm or a rescaling, a constant ReFT source, a combination of two families
def test_two_gloo_processes_reach_the_weights_of_one(tmp_path, task_files, method):
    """13 examples in global batches of 4 with 2 micro-batches per step: the epoch ends with a batch of one
    example, so one rank has nothing to do in that micro-batch and must still join the gradient exchange."""
    options = dict(method=method, epochs=2, max_train_examples=13, max_eval_examples=9, grad_accum=2, lr=1e-3)
    code, _, err = run_script("sentiment", base_args(tmp_path / "one", task_files, **options))
    assert code == 0, err

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "train_sentiment.py"), *base_args(tmp_path / "two", task_files, **options)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("trainable params:") == 1  # only rank 0 prints
    assert "2 processes" in done.stdout

    one = torch.load(checkpoint_path(tmp_path / "one" / "run"), weights_only=True)
    two = torch.load(checkpoint_path(tmp_path / "two" / "run"), weights_only=True)
    assert one["progress"]["step"] == two["progress"]["step"] == 2 * 2  # ceil(4 batches / 2) per epoch
    for name, tensor in one["trainable"].items():
        # Adam turns rounding noise in gradients that are zero in exact arithmetic into steps of up to lr.
        torch.testing.assert_close(two["trainable"][name], tensor, rtol=1e-4, atol=1e-4)
    start = initial_weights(parse_args("sst", base_args(tmp_path / "fresh", task_files, **options)))
    moved = max(float((one["trainable"][name] - tensor).abs().max()) for name, tensor in start.items())
    assert moved > 1e-3  # the comparison is between trained weights, not two untouched copies

    logs = [json.loads((tmp_path / name / "run" / "log.json").read_text()) for name in ("one", "two")]
    assert logs[1]["world_size"] == 2
    for a, b in zip(logs[0]["epochs"], logs[1]["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        # Adam would hide a gradient off by a constant factor (the weights would agree); its norm does not.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["dev"] == a["dev"]  # evaluation is sharded over the ranks and gathered back in order
    for split in ("dev", "test"):
        name = f"{method}-sst-{split}-out.csv"
        assert (tmp_path / "two" / "predictions" / name).read_text() == (tmp_path / "one" / "predictions" / name).read_text()


def initial_weights(config) -> dict[str, torch.Tensor]:
    """The weights both runs started from: the same seed builds the same random model and head."""
    trainer = Trainer(get_task(config.task), config, Distributed(), torch.device("cpu"))
    trainer.setup()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
