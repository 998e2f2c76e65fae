"""AdamW against torch.optim.AdamW and against the update rule worked by hand."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from modules.optimizer import AdamW


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def regression_data(steps: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 16, 8, generator=generator)
    return x, x.sum(-1, keepdim=True).sin()


def train(model, optimizer, x, y, start: int, stop: int) -> None:
    for i in range(start, stop):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[i]), y[i]).backward()
        optimizer.step()


def groups(model, optimizer_class, **kwargs):
    first, second = model[0], model[2]
    return optimizer_class([
        {"params": first.parameters(), "lr": 3e-3, "weight_decay": 0.1},
        {"params": second.parameters()},  # the defaults below
    ], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02, **kwargs)


@pytest.mark.slow  # 2,000 optimizer steps
def test_matches_torch_adamw_after_1000_steps(one_thread):
    ours_model, torch_model = mlp(), mlp()
    ours, reference = groups(ours_model, AdamW), groups(torch_model, torch.optim.AdamW)
    x, y = regression_data(1000)
    train(ours_model, ours, x, y, 0, 1000)
    train(torch_model, reference, x, y, 0, 1000)
    differences = [(a - b).abs().max().item() for a, b in zip(ours_model.parameters(), torch_model.parameters())]
    moved = [(a - b).abs().max().item() for a, b in zip(ours_model.parameters(), mlp().parameters())]
    assert max(differences) < 1e-6
    assert min(moved) > 1e-3  # the comparison is not vacuous: every tensor was trained


def hand_adamw(p, grads, lr, beta1, beta2, eps, weight_decay, correct_bias):
    """The update rule in float64 Python arithmetic, one element at a time."""
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            p[i] *= 1 - lr * weight_decay
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            m_hat, v_hat = (m[i] / (1 - beta1 ** t), v[i] / (1 - beta2 ** t)) if correct_bias else (m[i], v[i])
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("correct_bias", [False, True])
def test_first_two_steps_by_hand(correct_bias):
    start, grads = [1.0, -2.0, 0.5], [[0.5, 0.1, -1e-3], [-0.3, 0.2, 2e-3]]
    settings = dict(lr=0.1, eps=1e-3, weight_decay=0.05)
    param = nn.Parameter(torch.tensor(start))
    optimizer = AdamW([param], betas=(0.9, 0.999), correct_bias=correct_bias, **settings)
    for step, grad in enumerate(grads, start=1):
        param.grad = torch.tensor(grad)
        optimizer.step()
        expected = hand_adamw(start, grads[:step], beta1=0.9, beta2=0.999, correct_bias=correct_bias, **settings)
        assert param.tolist() == pytest.approx(expected, abs=1e-6)
    # Without correction the first step is 10x smaller than with it (m = 0.1 g), so the two runs differ.
    other = hand_adamw(start, grads, beta1=0.9, beta2=0.999, correct_bias=not correct_bias, **settings)
    assert max(abs(a - b) for a, b in zip(param.tolist(), other)) > 1e-2


def test_param_without_grad_is_untouched_and_has_no_state():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = AdamW([used, unused], lr=0.1, weight_decay=0.5)
    (used * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    optimizer.step()
    assert unused.grad is None and torch.equal(unused, torch.ones(3))  # not even weight decay
    assert unused not in optimizer.state and optimizer.state[used]["step"] == 1
    assert not torch.equal(used, torch.ones(3))


def test_resumed_run_is_bit_for_bit():
    x, y = regression_data(20)
    straight = mlp()
    optimizer = groups(straight, AdamW)
    train(straight, optimizer, x, y, 0, 20)

    first_half = mlp()
    optimizer = groups(first_half, AdamW)
    train(first_half, optimizer, x, y, 0, 10)
    buffer = io.BytesIO()
    torch.save({"model": first_half.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=123)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    optimizer = groups(resumed, AdamW, correct_bias=True)
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.param_groups[0]["lr"] == 3e-3 and optimizer.state[resumed[0].weight]["step"] == 10
    train(resumed, optimizer, x, y, 10, 20)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_state_has_the_parameter_dtype():
    param = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = AdamW([param], lr=0.1)  # bf16 holds no step below ~0.004 near 1: lr=1e-3 would be lost
    param.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[param]["exp_avg"].dtype == optimizer.state[param]["exp_avg_sq"].dtype == torch.bfloat16
    assert param.dtype == torch.bfloat16 and (param < 1).all()


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="dense"):
        AdamW(embedding.parameters()).step()


def test_closure_loss_is_returned():
    param = nn.Parameter(torch.ones(2))
    optimizer = AdamW([param])

    def closure():
        optimizer.zero_grad()
        loss = (param ** 2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 2.0 and param.grad is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1e-3}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": "0.1"}, "lr must be a finite number"),
    ({"eps": -1.0}, "eps must be >= 0"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": (0.9,)}, "betas must be a pair"),
    ({"correct_bias": "yes"}, "correct_bias must be True or False"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([nn.Parameter(torch.ones(1))], **kwargs)


def test_bad_param_group_value():
    with pytest.raises(ValueError, match="param group 1: lr must be >= 0"):
        AdamW([{"params": [nn.Parameter(torch.ones(1))]}, {"params": [nn.Parameter(torch.ones(1))], "lr": -1.0}])


# The course's reference: optimizer_test.npy of the CS224n GPT-2 starter (float32, 2 x 3), the weights its
# optimizer_test.py procedure (below, as the course runs it) reaches with the course's AdamW.
COURSE_REFERENCE = [[0.554827868938446, 0.8666566610336304, 0.0729198157787323],
                    [-0.4472450613975525, -0.29512280225753784, -0.27172720432281494]]


def test_course_optimizer_test_passes():
    """optimizer_test.py: a bias-free Linear(3, 2) trained 1,000 steps on numpy draws, lr 1e-3, weight decay 1e-4,
    correct_bias=True, compared with the reference at atol 1e-6, rtol 1e-4."""
    import numpy as np

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, correct_bias=True)
    for _ in range(1000):
        optimizer.zero_grad()
        x = torch.FloatTensor(rng.uniform(size=[model.in_features]))
        loss = ((torch.Tensor([x[0] + x[1], -x[2]]) - model(x)) ** 2).sum()
        loss.backward()
        optimizer.step()
    reference = torch.tensor(COURSE_REFERENCE)
    assert torch.allclose(reference, model.weight.detach(), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(reference, nn.Linear(3, 2, bias=False).weight.detach(), atol=1e-2)  # it trained
