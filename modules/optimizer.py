"""AdamW (Loshchilov & Hutter): Adam with weight decay decoupled from the gradient.

Per parameter p with gradient g, at step t (counted per parameter, so one that skips steps is still
corrected properly):

    p <- p * (1 - lr * weight_decay)                  decoupled decay, before the update, as torch.optim.AdamW
    m <- beta1 * m + (1 - beta1) * g                  first moment
    v <- beta2 * v + (1 - beta2) * g^2                second moment
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)         m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

With correct_bias=False (the name of the CS224n starter's flag) m_hat = m and v_hat = v.

The state (`step`, `exp_avg` = m, `exp_avg_sq` = v) has each parameter's dtype and device: a bf16
parameter gets bf16 moments, so keep trainable parameters in fp32 if their updates must be exact.

Speed: a plain per-tensor loop. On the 2-core development CPU, one step over GPT-2 124M's 148 fp32 tensors
took ~190-200 ms with this loop, ~210-245 ms without the folding of eps described in `step`, ~335 ms with
torch._foreach_* ops (they hold whole-model temporaries, which is slower on CPU) and ~370-450 ms with
torch.optim.AdamW. Not measured on a GPU, where foreach kernels would likely win.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Iterable, Optional, Union

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 correct_bias: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        _check_hyperparameters(defaults, "AdamW")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Checked before adding, so a group's own values (overriding the defaults) are validated too.
        _check_hyperparameters({**self.defaults, **param_group}, f"AdamW param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:  # frozen, or unused in this step's loss: no decay, no state
                    continue
                grad = p.grad
                if grad.is_sparse or p.is_complex():
                    raise RuntimeError("AdamW supports dense real-valued gradients only")

                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                if group["correct_bias"]:
                    correction1 = 1 - beta1 ** state["step"]
                    correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                else:
                    correction1 = correction2_sqrt = 1.0
                # lr * (m / c1) / (sqrt(v) / c2 + eps) == (lr * c2 / c1) * m / (sqrt(v) + eps * c2): the right
                # side scales one scalar instead of the whole sqrt(v) tensor (one pass over memory fewer).
                denominator = exp_avg_sq.sqrt().add_(eps * correction2_sqrt)
                p.addcdiv_(exp_avg, denominator, value=-lr * correction2_sqrt / correction1)
        return loss


def _check_hyperparameters(group: dict, where: str) -> None:
    def number(name):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
        return value

    for name in ("lr", "eps", "weight_decay"):
        if number(name) < 0:
            raise ValueError(f"{where}: {name} must be >= 0, got {group[name]!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {beta!r}")
    if not isinstance(group["correct_bias"], bool):
        raise ValueError(f"{where}: correct_bias must be True or False, got {group['correct_bias']!r}")
