"""Text generation with a key/value cache: greedy, temperature, top-k and top-p sampling, stop tokens,
and batches of prompts of different lengths (left-padded, so every row's next token is the last column).

    python -m models.generation --model gpt2 --prompt "Shall I compare thee"
    python -m models.generation --adapter runs/sonnet-lora/best --prompt "Shall I compare thee"   # a trained run
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from models.tokenizer import pad_sequences
from modules.kv_cache import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_token_id: Optional[int] = None  # generation of a row ends at this token (not included in its output)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: Optional[SamplingConfig] = None,
    use_cache: bool = True,
    pad_token_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> list[list[int]]:
    """Continues each prompt (a list of token ids); returns the new tokens of each row."""
    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.wte.weight.device
    batch, prompt_length = len(prompts), max(len(p) for p in prompts)
    total = model.virtual_length + prompt_length + sampling.max_new_tokens  # the cache holds virtual tokens too
    if total > model.config.n_positions:
        virtual = f" + the method's virtual tokens ({model.virtual_length})" if model.virtual_length else ""
        raise ValueError(
            f"generate: prompt ({prompt_length} tokens) + max_new_tokens ({sampling.max_new_tokens}){virtual} exceeds "
            f"the model context of {model.config.n_positions}"
        )
    ids, mask = pad_sequences(prompts, pad_token_id, side="left", device=device)

    was_training = model.training
    model.eval()
    try:
        step = _cached_steps(model, ids, mask, total) if use_cache else _uncached_steps(model, ids, mask)
        outputs = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        last_hidden = next(step)
        for produced in range(1, sampling.max_new_tokens + 1):
            token = next_token(model.hidden_state_to_token(last_hidden), sampling, generator)
            token = token.masked_fill(finished, pad_token_id)
            if sampling.stop_token_id is not None:
                finished |= token == sampling.stop_token_id
            for row in (~finished).nonzero().flatten().tolist():
                outputs[row].append(int(token[row]))
            if produced == sampling.max_new_tokens or bool(finished.all()):
                break
            last_hidden = step.send(token)
        return outputs
    finally:
        model.train(was_training)


def _cached_steps(model, ids, mask, total):
    """Prefills the prompt once, then feeds one token per step; yields the newest hidden state."""
    cache = KVCache.for_model(model.config, ids.shape[0], total)
    token = yield model(ids, mask, cache=cache)["last_token"]
    one = torch.ones(ids.shape[0], 1, dtype=mask.dtype, device=mask.device)
    while True:
        token = yield model(token[:, None], one, cache=cache)["last_token"]


def _uncached_steps(model, ids, mask):
    """Recomputes the whole sequence every step: the reference the cached path is tested against. The prompt
    mask keeps interventions on the original prompt positions as the sequence grows."""
    prompt_mask = mask.bool()
    while True:
        token = yield model(ids, mask, prompt_mask=prompt_mask)["last_token"]
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        prompt_mask = torch.cat([prompt_mask, torch.zeros_like(token, dtype=torch.bool)[:, None]], dim=1)


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: Optional[SamplingConfig] = None, **kwargs) -> list[str]:
    """String-in, string-out convenience over `generate`."""
    encoded = [tokenizer.encode(p) for p in prompts]
    new_tokens = generate(model, encoded, sampling, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return [tokenizer.decode(tokens) for tokens in new_tokens]


def adapter_base(directory: str) -> Optional[str]:
    """The name or path of the base model an adapter records (None when it records none)."""
    from models.peft import read_adapter_config

    return (read_adapter_config(directory).get("base_model") or {}).get("name_or_path")


def load_language_model_adapter(model, directory: str, allow_other_base: bool) -> None:
    """Applies a saved adapter to a bare GPT2Model, refusing one saved from a task model with a head of its own
    (a sentiment or paraphrase run's), whose tensors belong to a classifier."""
    from safetensors import safe_open

    from models.peft import ADAPTER_WEIGHTS, load_adapter

    try:
        with safe_open(f"{directory}/{ADAPTER_WEIGHTS}", framework="pt") as file:
            keys = list(file.keys())
    except Exception as error:  # SafetensorError or OSError: named with the file
        raise ValueError(f"{directory}/{ADAPTER_WEIGHTS}: cannot read the adapter weights ({error})") from None
    if any(key.startswith("head.") for key in keys):
        raise ValueError(f"{directory}: this adapter belongs to a classifier (its tensors include a task head, "
                         "head.*): generation needs a language-model adapter, such as a sonnet run's <run>/best")
    load_adapter(model, directory, trainable=True, allow_other_base=allow_other_base)


def main(argv=None) -> int:
    from models.gpt2 import PRECISION_CHOICES, PRECISION_HELP, GPT2Model
    from models.tokenizer import GPT2Tokenizer, tokenizer_source

    parser = argparse.ArgumentParser(description="Continue a prompt with GPT-2.")
    parser.add_argument("--model", default=None, help="hub name, local checkpoint directory, or random:<size> "
                        "(default: the base the --adapter was trained on, else gpt2)")
    parser.add_argument("--adapter", default=None, help="an adapter directory saved by save_adapter, such as a "
                        "sonnet run's <run>/best: its method and trained tensors are applied to the base")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="apply the --adapter even to a base with other weights than the one it was trained on")
    parser.add_argument("--tokenizer", default=None,
                        help="directory with vocab.json + merges.txt (default: the model directory, or the hub's gpt2)")
    parser.add_argument("--prompt", action="append", required=True, help="may be given several times (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    args = parser.parse_args(argv)

    if not args.sample and (args.temperature != 1.0 or args.top_k is not None or args.top_p is not None):
        parser.error("--temperature, --top-k and --top-p shape sampling: add --sample (without it decoding is greedy)")
    try:
        sampling = SamplingConfig(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        parser.error(str(error))
    try:
        base = args.model or (adapter_base(args.adapter) if args.adapter else None) or "gpt2"
        model = GPT2Model.from_pretrained(base, device=args.device)
        if args.adapter:  # its tensors stay trainable while the precision is applied, so they stay fp32
            load_language_model_adapter(model, args.adapter, args.allow_other_base)
        else:
            model.requires_grad_(False)  # inference only: every weight frozen, so bf16 stores them all
        model.set_precision(args.precision).requires_grad_(False)
        tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_source(base, args.tokenizer))
        sampling.stop_token_id = tokenizer.eos_token_id
        generator = torch.Generator(model.wte.weight.device).manual_seed(args.seed)
        texts = generate_text(model, tokenizer, args.prompt, sampling, generator=generator)
    except (ValueError, OSError) as error:  # a bad checkpoint, a missing file, an offline hub, a too-long prompt
        print(f"error: {error}", file=sys.stderr)
        return 1
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
