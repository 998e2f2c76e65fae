"""The peers' side of the benchmark: transformers, peft and pyreft, as their users run them, on the weights
bench/ours.py exported. Runs in bench/.venv-peers (see bench/README.md), driven by bench/run.py.

    bench/.venv-peers/bin/python bench/peers.py --worker --threads 2
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is loaded from the exported directory
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)


def precision_context(precision: str):
    """The transformers user's bf16 on CPU: fp32 weights, matmuls under autocast."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_case(weights: str, precision: str) -> common.Case:
    from transformers import GPT2Model

    model = GPT2Model.from_pretrained(weights).eval()
    ids = common.token_batch(*common.FORWARD_SHAPE)

    def step():
        with torch.inference_mode(), precision_context(precision):
            model(input_ids=ids)
        return ids.numel()

    with torch.inference_mode(), precision_context(precision):
        out = model(input_ids=ids).last_hidden_state
    return common.Case(step, {
        "output_sample": out[0, -1, :8].float().tolist(),
        "precision": precision,
        "attention": model.config._attn_implementation,
    })


def generate_case(weights: str, precision: str, batch: int) -> common.Case:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(weights).eval()
    ids = common.token_batch(batch, common.PROMPT_LENGTH)
    mask = torch.ones_like(ids)
    produced = []

    def step():
        with torch.inference_mode(), precision_context(precision):
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                max_new_tokens=common.NEW_TOKENS, min_new_tokens=common.NEW_TOKENS,  # all 128, EOS or not
                pad_token_id=common.EOS_TOKEN_ID,
            )
        produced[:] = out[:, ids.shape[1]:].tolist()
        return sum(len(row) for row in produced)

    step()
    return common.Case(step, {"first_tokens": produced[0][:16], "precision": precision})


def reft_locations(batch: int, length: int, layers: int) -> dict:
    """pyvene's unit_locations: for each intervention, each example, the positions edited (the last one)."""
    return {"sources->base": (None, [[[length - 1]] * batch] * layers)}


def peft_config(method: str, width: int):
    """peft's configuration of a training-step case. The soft prompts use peft's feature-extraction model on a bare
    GPT2Model: it prepends the virtual tokens (prompt, ptuning) or puts them in the attention's past keys and
    values (prefix), so the last hidden state is still the last real token's."""
    import peft

    if method == "ia3":  # peft's GPT-2 default: the fused c_attn output and the input of mlp.c_proj
        return peft.IA3Config()
    if method in ("lora", "lora_c_attn", "dora"):
        return peft.LoraConfig(r=common.LORA_RANK, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
                               target_modules=["c_attn"], fan_in_fan_out=True,  # GPT-2's Conv1D is (in, out)
                               use_dora=method == "dora")
    settings = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=common.VIRTUAL_TOKENS)
    if method == "ptuning":
        return peft.PromptEncoderConfig(**settings, encoder_reparameterization_type="MLP", encoder_hidden_size=width)
    return (peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig)(**settings)


def train_step_case(weights: str, method: str, precision: str = "bf16") -> common.Case:
    """One step of sentiment training with each library's own recipe: GPT-2 + a Linear head on the last
    token, bf16 autocast (fp32 with `precision` fp32), torch AdamW over what the library leaves trainable plus the
    head."""
    from transformers import GPT2Model

    gpt = GPT2Model.from_pretrained(weights)
    head = nn.Linear(gpt.config.n_embd, common.NUM_LABELS)
    ids = common.token_batch(*common.STEP_SHAPE)
    labels = common.label_batch(common.STEP_SHAPE[0])
    mask = torch.ones_like(ids)
    info = {"method": method, "precision": precision}

    if method == "full":
        gpt.train()
        params = list(gpt.parameters())

        def hidden():
            return gpt(input_ids=ids, attention_mask=mask).last_hidden_state
    elif method in ("lora", "lora_c_attn", "dora", "ia3", "prompt", "ptuning", "prefix"):
        import peft

        model = peft.get_peft_model(gpt, peft_config(method, gpt.config.n_embd))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        info["library"] = f"peft {peft.__version__}"

        def hidden():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    elif method in common.REFT_INTERVENTIONS:
        import pyreft

        layers = gpt.config.n_layer
        intervention = getattr(pyreft, f"{common.REFT_INTERVENTIONS[method]}Intervention")
        # dtype fp32 as ours: pyreft's default would be bf16 parameters, which AdamW cannot update well. No bias on
        # the projections of NoReFT and NodiReFT (add_bias), as ours: their source already has one.
        settings = dict(embed_dim=gpt.config.n_embd, low_rank_dimension=common.LOREFT_RANK, dtype=torch.float32,
                        add_bias=False)
        config = pyreft.ReftConfig(representations=[{
            "layer": layer, "component": "block_output", "low_rank_dimension": common.LOREFT_RANK,
            "intervention": intervention(**settings),
        } for layer in range(layers)])
        model = pyreft.get_reft_model(gpt, config)
        model.model.train()  # dropout on, as in the other cases (get_reft_model leaves the base in eval)
        for intervention in model.interventions.values():
            (intervention[0] if isinstance(intervention, (list, tuple)) else intervention).train()
        params = model.get_trainable_parameters()
        locations = reft_locations(ids.shape[0], ids.shape[1], layers)
        info["library"] = f"pyreft {getattr(pyreft, '__version__', '0.1.0')}"

        def hidden():
            _, intervened = model({"input_ids": ids, "attention_mask": mask}, unit_locations=locations)
            return intervened.last_hidden_state
    else:
        raise ValueError(f"unknown method {method!r}")

    params = params + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=common.LEARNING_RATE, weight_decay=0.0)

    def step():
        with precision_context(precision):
            logits = head(hidden()[:, -1])
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ids.numel()

    info["trainable_parameters"] = sum(p.numel() for p in params)
    info["head_parameters"] = sum(p.numel() for p in head.parameters())
    info["optimizer"] = "torch.optim.AdamW"
    # The check that the head and the method's parameters really train: every one gets a gradient.
    with precision_context(precision):
        F.cross_entropy(head(hidden()[:, -1]).float(), labels).backward()
    info["parameters_without_gradient"] = sum(p.numel() for p in params if p.grad is None)
    optimizer.zero_grad(set_to_none=True)
    return common.Case(step, info)


def versions() -> dict:
    import importlib.metadata as metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:  # a peers' environment for the peft cases only, say
            return "not installed"

    return {name: version(name) for name in ("torch", "transformers", "peft", "pyreft", "pyvene")}


CASES = {
    "forward": forward_case,
    "generate": generate_case,
    "train_step": train_step_case,
    "versions": versions,
}

if __name__ == "__main__":
    common.worker_main(CASES, __doc__)
