"""models.peft: LoRA and the ReFT family applied to the hand-written GPT-2: structure, parameter counts,
identity at the start, honest training, positions under padding, adapter files, composition, generation and
the method configuration. The layers' own formulas are in test_lora.py and test_reft.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import GPT2Config
from models.generation import SamplingConfig, generate
from models.gpt2 import GPT2Model
from models.methods import saved_form
from models.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MethodConfig,
    adapter_file_size,
    applied_methods,
    apply_method,
    format_parameter_summary,
    load_adapter,
    parameter_summary,
    save_adapter,
)
from modules.adapted_linear import AdaptedLinear
from modules.lora import LoRAGPT2Layer
from modules.reft import ReFTGPT2Layer
from tests.fixtures.models import random_model
from tests.fixtures.peft import ADAPTING, assert_padding_changes_nothing, fresh, perturb_trainable, right_padded


# ----------------------------------------------------------------------------- structure and counts
def test_wrappers_freeze_the_layer_and_hold_their_parts_in_module_dicts():
    lora = fresh(MethodConfig("lora", targets=("query", "value", "mlp_out"), layers=[1]))
    assert isinstance(lora.h[1], LoRAGPT2Layer) and not isinstance(lora.h[0], LoRAGPT2Layer)
    assert isinstance(lora.h[1].lora, nn.ModuleDict) and set(lora.h[1].lora) == {"query", "value", "mlp_out"}
    assert isinstance(lora.h[1].layer.attn.c_attn, AdaptedLinear)
    for name, param in lora.h[1].named_parameters():
        assert param.requires_grad == name.startswith("lora."), name
    reft = fresh(MethodConfig("reft", components=("attention", "ffn")))
    layer = reft.h[0]
    assert isinstance(layer, ReFTGPT2Layer) and isinstance(layer.interventions, nn.ModuleDict)
    assert set(layer.interventions) == {"attention", "ffn"} and "default" in layer.interventions["ffn"]
    assert not any(p.requires_grad for p in layer.layer.parameters())
    assert not reft.wte.weight.requires_grad and not reft.ln_f.weight.requires_grad


@pytest.mark.slow  # eleven random models at gpt2 shape (124M parameters each)
@pytest.mark.parametrize("config, expected", [
    # pyreft reports 73,776 for LoReFT rank 4 on all 12 layers of gpt2 with tied positions: 12 * (2*768*4 + 4).
    (MethodConfig("loreft", rank=4, positions="f1+l1"), 73_776),
    (MethodConfig("loreft", rank=4, positions="f1+l1", tie_positions=False), 2 * 73_776),
    (MethodConfig("direft", rank=4, positions="l1"), 73_776),
    (MethodConfig("nodireft", rank=4, positions="l1"), 73_776),
    (MethodConfig("consreft", rank=4), 12 * (4 * 768 + 4)),  # 36,912: no W
    (MethodConfig("lobireft", rank=4), 36_912),
    (MethodConfig("reft", rank=8), 12 * 2 * (2 * 768 * 8 + 8)),  # attention and ffn
    (MethodConfig("lora", rank=8), 12 * 2 * (8 * 768 + 768 * 8)),  # query, value
    (MethodConfig("lora", rank=8, targets=("query", "key", "value", "attn_out", "mlp_in", "mlp_out"), layers=[0]),
     4 * (8 * 768 + 768 * 8) + (8 * 768 + 3072 * 8) + (8 * 3072 + 768 * 8)),
    (MethodConfig("bitfit"), 12 * (3 * 768 + 768 + 4 * 768 + 768 + 2 * 768) + 768),
    (MethodConfig("layernorm"), 12 * 2 * (768 + 768) + 2 * 768),  # ln_1, ln_2 in each layer, and ln_f
    (MethodConfig("layernorm", layers=[0, 11]), 2 * 2 * (768 + 768)),  # chosen layers: not ln_f
    (MethodConfig("last-linear-layer"), 0),
    (MethodConfig("full"), 124_439_808),
])
def test_trainable_counts_equal_the_formulas_at_gpt2_shape(config, expected):
    model = random_model("gpt2")
    apply_method(model, config)
    summary = parameter_summary(model)
    assert summary["trainable"] == expected
    assert summary["total"] == 124_439_808 + (0 if config.method in ("full", "bitfit", "layernorm", "last-linear-layer") else expected)
    assert f"trainable params: {expected:,}" in format_parameter_summary(model)


@pytest.mark.parametrize("config, expected", [
    (MethodConfig("lora", rank=8, targets=("c_attn",)), 12 * (8 * 768 + 3 * 768 * 8)),  # one A, one B of 2,304 rows
    (MethodConfig("dora", rank=8), 313_344),  # query, value: LoRA's 294,912 + 12 x 2 x 768 magnitudes
    (MethodConfig("dora", rank=8, targets=("c_attn",)), 12 * (8 * 768 + 3 * 768 * 8 + 3 * 768)),
    (MethodConfig("ia3"), 55_296),  # 12 x (768 + 768 + 3,072): keys, values, the FFN's inner activation
    (MethodConfig("ia3", ia3_targets=("c_attn", "ffn")), 12 * (3 * 768 + 3072)),  # peft's GPT-2 default
])
def test_weight_method_counts_equal_the_formulas_at_gpt2_shape(config, expected):
    """Counted on the meta device (no memory), as models/method_table.py counts the README's."""
    if config.method == "dora" and config.targets == ("query", "value"):
        assert expected == 12 * 2 * (8 * 768 + 768 * 8) + 12 * 2 * 768
    if config.method == "ia3" and config.ia3_targets == ("key", "value", "ffn"):
        assert expected == 12 * (768 + 768 + 3072)
    with torch.device("meta"):
        gpt = GPT2Model(GPT2Config.preset("gpt2"))
    apply_method(gpt, config)
    assert parameter_summary(gpt)["trainable"] == expected
    assert f"trainable params: {expected:,} || all params: {124_439_808 + expected:,}" in format_parameter_summary(gpt)


def test_method_structure_errors():
    with pytest.raises(ValueError, match="intervention rank 65 exceeds the hidden size 64"):
        fresh(MethodConfig("loreft", rank=65))
    layer = LoRAGPT2Layer(fresh().h[0], ["query"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="LoRA: a weight update is already applied to attn.c_attn"):
        LoRAGPT2Layer(layer.layer, ["value"], rank=2, alpha=2.0)
    with pytest.raises(TypeError, match="expects a GPT2Model"):
        apply_method(nn.Linear(2, 2), MethodConfig("lora"))


# ----------------------------------------------------------------------------- identity and honest training
# Soft prompts and prefixes do not start as the identity (virtual tokens change outputs from step 0; tested in
# test_soft_prompts.py), nor can consreft (test_reft.py).
@pytest.mark.parametrize("name", [name for name, config in ADAPTING.items()
                                  if config.spec.family != "prompt" and config.method != "consreft"])
def test_methods_start_as_the_identity(name):
    base, adapted = fresh(), fresh(ADAPTING[name])
    ids, mask = right_padded([9, 5])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids, mask)["last_hidden_state"], base(ids, mask)["last_hidden_state"],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(ADAPTING) + ["last-linear-layer"])
def test_one_step_changes_only_trainable_tensors(name):
    config = ADAPTING[name] if name in ADAPTING else MethodConfig(name)
    model = fresh(config)
    head = nn.Linear(model.config.n_embd, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids, mask = right_padded([9, 5, 7])
    loss = nn.functional.cross_entropy(head(model(ids, mask)["last_token"]), torch.tensor([0, 1, 2]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        if key in reached:
            assert changed, f"{name}: trainable {key} got a gradient but did not move"
        elif key not in trainable:
            assert not changed, f"{name}: frozen {key} changed"
    assert reached <= trainable
    assert name == "last-linear-layer" or reached


# ----------------------------------------------------------------------------- positions under padding
@pytest.mark.parametrize("name", list(ADAPTING))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_each_example_its_own_outputs(name, side):
    assert_padding_changes_nothing(fresh(ADAPTING[name]), side)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", list(ADAPTING))
def test_bf16_keeps_the_trainable_parts_in_fp32_and_stays_close_to_fp32(name):
    model = fresh(ADAPTING[name])
    perturb_trainable(model, scale=0.2)
    ids, mask = right_padded([7, 4])
    with torch.no_grad():
        exact = model(ids, mask)["last_hidden_state"]
    model.set_precision("bf16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.wte.weight.dtype == torch.bfloat16  # frozen matrices are stored in bf16
    out = model(ids, mask)["last_hidden_state"]
    assert (out.float() - exact).abs().mean() < 0.05 * exact.abs().mean()
    out.float().square().mean().backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


# ----------------------------------------------------------------------------- adapter files
class TinyClassifier(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 2)

    def forward(self, ids, mask):
        return self.head(self.gpt(ids, mask)["last_token"])


@pytest.mark.parametrize("name", list(ADAPTING) + ["last-linear-layer", "full"])
def test_adapter_reload_reproduces_outputs_exactly(tmp_path, name):
    config = ADAPTING[name] if name in ADAPTING else MethodConfig(name)
    model = TinyClassifier(fresh(config))
    perturb_trainable(model)
    directory = save_adapter(model, tmp_path / name)
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    # A training-only reparametrisation (P-tuning's encoder, a prefix projection) is saved folded.
    assert saved["methods"][0] == saved_form(config).to_dict() and saved["base"]["n_embd"] == 64
    size = adapter_file_size(directory)
    assert size == (directory / ADAPTER_WEIGHTS).stat().st_size + (directory / ADAPTER_CONFIG).stat().st_size
    if name not in ("full",):  # only the trained tensors are stored
        assert (directory / ADAPTER_WEIGHTS).stat().st_size < 4 * parameter_summary(model)["trainable"] + 20_000

    reloaded = TinyClassifier(fresh())  # a freshly loaded base: the method is applied by load_adapter
    load_adapter(reloaded, directory)
    ids, mask = right_padded([7, 2, 5])
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask), model(ids, mask))


def test_adapter_load_errors(tmp_path):
    model = TinyClassifier(fresh(ADAPTING["loreft"]))
    directory = save_adapter(model, tmp_path / "loreft")
    other_shape = TinyClassifier(GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4)))
    with pytest.raises(ValueError, match="another shape.*n_embd 64 vs 32"):
        load_adapter(other_shape, directory)
    with_bitfit = TinyClassifier(fresh(ADAPTING["bitfit"]))  # a LoRA adapter cannot join BitFit: one weight-space method
    lora = save_adapter(TinyClassifier(fresh(ADAPTING["lora"])), tmp_path / "lora")
    with pytest.raises(ValueError, match="already has bitfit applied, so lora cannot be added: bitfit[+]lora: at most one"):
        load_adapter(with_bitfit, lora)
    with pytest.raises(FileNotFoundError, match="no adapter config"):
        load_adapter(TinyClassifier(fresh()), tmp_path / "missing")
    (directory / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the adapter weights"):
        load_adapter(TinyClassifier(fresh()), directory)


def version_1_adapter(directory, model) -> None:
    """Turns `directory`, saved from `model` by today's code, into what version 1 of the format wrote for it: the
    same tensors, version 1, and `nodireft` under its old name `direft`."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert config["version"] == 2
    config["version"] = 1
    for method in config["methods"]:
        method["method"] = {"nodireft": "direft"}.get(method["method"], method["method"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_a_version_1_adapter_loads_to_the_outputs_it_had(tmp_path, method):
    """Version 1 orthonormalised LoReFT's R by plain QR (rows' signs as LAPACK chose them) and called today's
    nodireft (W2 free) `direft`. Its outputs are recomputed here by version 1's rules, written out."""
    saved_as = {"loreft": "loreft", "direft": "nodireft"}[method]
    model = fresh(MethodConfig(saved_as, rank=3, positions="f1+l1"))
    perturb_trainable(model, scale=0.3)
    directory = save_adapter(model, tmp_path / method)
    version_1_adapter(directory, model)
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    ids, mask = right_padded([6, 4])
    for block in model.h:  # version 1's computation, on the saved tensors
        intervention = block.interventions["ffn"]["default"].interventions[0]
        if method == "loreft":
            intervention.projection = lambda i=intervention: torch.linalg.qr(i.rotate.float().t())[0].t()
    with torch.no_grad():
        old = model(ids, mask)["last_hidden_state"]
        assert (old - fresh(MethodConfig(saved_as, rank=3, positions="f1+l1"))(ids, mask)["last_hidden_state"]).abs().max() > 1e-3

    loaded = load_adapter(fresh(), directory)
    assert [m.method for m in applied_methods(loaded)] == [saved_as]
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask)["last_hidden_state"], old)
    resaved = json.loads((save_adapter(loaded, tmp_path / "again") / ADAPTER_CONFIG).read_text())
    assert resaved["version"] == 2 and resaved["methods"][0]["method"] == saved_as
    if method == "loreft":  # today's code reading the same tensors as version 2 computes something else
        (directory / ADAPTER_CONFIG).write_text((tmp_path / "again" / ADAPTER_CONFIG).read_text())
        save_file(tensors, directory / ADAPTER_WEIGHTS)
        with torch.no_grad():
            assert (load_adapter(fresh(), directory)(ids, mask)["last_hidden_state"] - old).abs().max() > 1e-3


def test_an_adapter_of_a_newer_format_version_is_refused(tmp_path):
    directory = save_adapter(fresh(ADAPTING["loreft"]), tmp_path / "loreft")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    (directory / ADAPTER_CONFIG).write_text(json.dumps({**config, "version": 3}))
    with pytest.raises(ValueError, match=r"adapter_config.json: adapter format version 3, but this code reads "
                                         r"versions 1 to 2 \(an adapter written by a newer version"):
        load_adapter(fresh(), directory)


def model_state(model: nn.Module) -> list:
    return [(name, p.dtype, p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()]


def same_state(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))


@pytest.mark.parametrize("damage", ["unreadable", "another-methods-weights", "wrong-shape"])
def test_a_failed_adapter_load_leaves_the_model_unchanged(tmp_path, damage):
    directory = save_adapter(TinyClassifier(fresh(ADAPTING["loreft"])), tmp_path / "loreft")
    weights = directory / ADAPTER_WEIGHTS
    if damage == "unreadable":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "another-methods-weights":  # a LoRA adapter's tensors beside LoReFT's config
        other = save_adapter(TinyClassifier(fresh(ADAPTING["lora"])), tmp_path / "lora")
        weights.write_bytes((other / ADAPTER_WEIGHTS).read_bytes())
    else:
        tensors = load_file(weights)
        tensors["head.weight"] = torch.zeros(3, 64)
        save_file(tensors, weights)
    model = TinyClassifier(fresh())
    before = model_state(model)
    with pytest.raises(ValueError, match="cannot read the adapter weights|does not fit this model"):
        load_adapter(model, directory)
    assert applied_methods(model.gpt) == [] and same_state(model_state(model), before)
    assert all(type(layer).__name__ == "GPT2Layer" for layer in model.gpt.h)


def test_two_reft_adapters_trained_separately_both_apply(tmp_path):
    first = fresh(MethodConfig("loreft", layers=[1], positions="l1"))
    perturb_trainable(first, seed=1, scale=0.3)
    save_adapter(first, tmp_path / "first")
    second = fresh(MethodConfig("loreft", layers=[0], positions="f1", components=("attention",)))
    perturb_trainable(second, seed=2, scale=0.3)
    save_adapter(second, tmp_path / "second")

    both = fresh()
    load_adapter(both, tmp_path / "first")
    load_adapter(both, tmp_path / "second", name="second")
    assert set(both.h[1].interventions["ffn"]) == {"default"} and set(both.h[0].interventions["attention"]) == {"second"}
    ids, _ = right_padded([6])
    with torch.no_grad():
        out_both, out_first, out_second, out_base = (m(ids)["last_hidden_state"][0] for m in (both, first, second, fresh()))
    # The first adapter edits only the last token's output of the last layer, so every other token is what the
    # second adapter alone makes of it (its layer-0 edit of the first token reaches them through attention).
    torch.testing.assert_close(out_both[:5], out_second[:5], atol=1e-6, rtol=0)
    assert (out_second[:5] - out_base[:5]).abs().max() > 1e-3
    # The last token carries both edits.
    assert (out_both[5] - out_first[5]).abs().max() > 1e-4
    assert (out_both[5] - out_second[5]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="adapter named 'default' is already applied"):
        load_adapter(both, tmp_path / "second")  # both were saved as 'default': one needs another name


# ----------------------------------------------------------------------------- generation
@pytest.mark.slow  # 36 generated tokens with and without the cache, per method
@pytest.mark.parametrize("name", list(ADAPTING))
def test_generation_with_interventions_cache_equals_no_cache(name):
    model = fresh(ADAPTING[name])
    perturb_trainable(model, scale=0.5)
    prompts = [[5, 17, 400, 33, 9], [101, 7], [7, 7, 7, 2000]]
    sampling = SamplingConfig(max_new_tokens=12)
    cached = generate(model, prompts, sampling, use_cache=True)
    assert cached == generate(model, prompts, sampling, use_cache=False)
    assert cached != generate(fresh(), prompts, sampling), "the trained interventions must change the output"


def test_prompt_interventions_apply_in_the_prefill_only():
    """With the cache, decoding steps carry no prompt tokens, so a prompt-position intervention is silent
    there: generating with it equals generating from the base model with the edited prompt states cached."""
    model = fresh(MethodConfig("loreft", positions="l1"))
    perturb_trainable(model, scale=0.5)
    calls = []
    for layer in model.h:
        layer.interventions["ffn"]["default"].register_forward_hook(lambda m, args, out: calls.append(args[1].prompt_mask is not None))
    generate(model, [[5, 17, 400]], SamplingConfig(max_new_tokens=4))
    assert calls == [True, True] + [False, False] * 3


# ----------------------------------------------------------------------------- configuration
def test_method_config_validation_and_round_trip():
    config = MethodConfig("loreft", rank=2, layers=[3, 1, 1], positions="f2+l2")
    assert config.layers == [1, 3] and config.components == ("ffn",) and config.alpha == 2.0
    assert MethodConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in [
        (dict(method="prefixes"), "unknown method"),
        (dict(method="loreft", targets=("query",)), "'targets' does not apply to method 'loreft'"),
        (dict(method="lora", targets=("queries",)), "LoRA targets must be among"),
        (dict(method="lora", rank=0), "rank must be >= 1"),
        (dict(method="reft", positions="middle"), "positions must be 'all' or like"),
        (dict(method="reft", components=("mlp",)), "components must be among"),
        (dict(method="reft", activation="swish"), "activation must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            MethodConfig(**bad)
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        apply_method(random_model("tiny"), MethodConfig("lora", layers=[5]))


def test_loading_onto_a_model_that_has_the_methods_builds_no_skeleton(tmp_path, monkeypatch):
    """With the saved methods already applied, load_adapter checks the file against the model itself."""
    import models.peft as peft

    config = MethodConfig("loreft", rank=2, positions="l1")
    model = fresh(config)
    perturb_trainable(model)
    save_adapter(model, tmp_path / "adapter")
    target = fresh(config)
    monkeypatch.setattr(peft, "skeleton_shapes", lambda *args: pytest.fail("built a skeleton needlessly"))
    load_adapter(target, tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 6))
    assert torch.equal(target(ids)["last_hidden_state"], model(ids)["last_hidden_state"])


# ----------------------------------------------------------------------------- adapter files that do not fit
def drop_tensor(directory, key):
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    del tensors[key]
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "gpt2-peft-adapter"})


def edit_config(directory, edit):
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    edit(config)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("recount", [False, True], ids=["config-untouched", "config-recounted"])
def test_an_adapter_file_with_a_tensor_missing_is_refused_naming_it(tmp_path, recount):
    """Loading it would leave that parameter at its fresh value: silently other outputs. Refused even when the
    config's tensor count was edited to match, because the methods say which tensors they have."""
    directory = save_adapter(TinyClassifier(fresh(ADAPTING["loreft"])), tmp_path / "loreft")
    key = "gpt.h.1.interventions.ffn.default.interventions.0.rotate"
    assert key in load_file(directory / ADAPTER_WEIGHTS)
    drop_tensor(directory, key)
    if recount:
        edit_config(directory, lambda config: config.update(tensors=config["tensors"] - 1))
    model = TinyClassifier(fresh())
    before = model_state(model)
    with pytest.raises(ValueError, match=rf"^{directory / ADAPTER_WEIGHTS}: lacks 1 tensor\(s\) of its methods: {key};"):
        load_adapter(model, directory)
    assert same_state(model_state(model), before)


def test_an_adapter_file_without_its_task_head_is_refused_by_the_count(tmp_path):
    directory = save_adapter(TinyClassifier(fresh(ADAPTING["lora"])), tmp_path / "lora")
    drop_tensor(directory, "head.weight")
    with pytest.raises(ValueError, match=rf"^{directory / ADAPTER_WEIGHTS}: holds \d+ tensors, but {ADAPTER_CONFIG} "
                                         r"says \d+ were saved \(perhaps missing: head\.weight\)"):
        load_adapter(TinyClassifier(fresh()), directory)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("base"), r"'base' must be an object with the base model's shape \(vocab_size, n_positions, "
                              r"n_embd, n_layer, n_head\), got None"),
    (lambda c: c.pop("methods"), "'methods' must be a non-empty list of the applied methods, got None"),
    (lambda c: c.update(methods="loreft"), "'methods' must be a non-empty list of the applied methods, got 'loreft'"),
    (lambda c: c.update(methods=[]), "'methods' must be a non-empty list"),
    (lambda c: c["base"].pop("n_head"), "base.n_head must be a positive integer, got None"),
    (lambda c: c["base"].update(n_embd="64"), "base.n_embd must be a positive integer, got '64'"),
    (lambda c: c.update(tensors="many"), "'tensors' must be the number of tensors in adapter.safetensors, got 'many'"),
    (lambda c: c["methods"][0].update(method="prefix-tuning"), "methods\\[0\\]: unknown method 'prefix-tuning'"),
    (lambda c: c["methods"][0].update(rank="four"), "methods\\[0\\]: rank must be >= 1, got 'four'"),
    (lambda c: c.update(methods=["loreft"]), "methods\\[0\\]: a method configuration must be a JSON object"),
])
def test_adapter_config_errors_are_one_clear_error_naming_the_config(tmp_path, edit, message):
    directory = save_adapter(TinyClassifier(fresh(ADAPTING["loreft"])), tmp_path / "loreft")
    edit_config(directory, edit)
    model = TinyClassifier(fresh())
    before = model_state(model)
    with pytest.raises(ValueError, match=f"^{directory / ADAPTER_CONFIG}: {message}"):
        load_adapter(model, directory)
    assert same_state(model_state(model), before)


def test_every_adapter_load_error_names_the_adapter_directory(tmp_path):
    directory = save_adapter(TinyClassifier(fresh(ADAPTING["loreft"])), tmp_path / "loreft")
    lora = save_adapter(TinyClassifier(fresh(ADAPTING["lora"])), tmp_path / "lora")
    with_bitfit = TinyClassifier(fresh(ADAPTING["bitfit"]))  # lora cannot join it: one weight-space method
    with pytest.raises(ValueError, match=f"^{lora}: this model already has bitfit applied"):
        load_adapter(with_bitfit, lora)
    with pytest.raises(ValueError, match=f"^{lora}: only a single stacking"):
        load_adapter(TinyClassifier(fresh()), lora, name="other")
    both = TinyClassifier(fresh())
    load_adapter(both, directory)
    layer_0 = save_adapter(TinyClassifier(fresh(MethodConfig("loreft", layers=[0]))), tmp_path / "layer-0")
    with pytest.raises(ValueError, match=f"^{layer_0}: an adapter named 'default' is already applied"):
        load_adapter(both, layer_0, name="default")


@pytest.mark.parametrize("method", ["loreft", "lora"])
def test_an_adapter_of_another_rank_onto_the_same_adapter_blames_the_rank(tmp_path, method):
    directory = save_adapter(fresh(MethodConfig(method, rank=4)), tmp_path / "rank-4")
    model = fresh(MethodConfig(method, rank=8))
    with pytest.raises(ValueError) as error:
        load_adapter(model, directory)
    called = " 'default'" if method == "loreft" else ""
    assert str(error.value) == (f"{directory}: the adapter's {method}{called} does not fit the {method}{called} this "
                                "model already has (rank 4 in the adapter, 8 on this model" +
                                (", alpha 4.0 in the adapter, 8.0 on this model" if method == "loreft" else "") +
                                "): its tensors have other shapes; load it onto a freshly loaded base model")


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_what_trains_after_a_load_the_loaded_tensors_frozen_unless_asked_and_the_rest_as_it_was(tmp_path, caplog):
    first = TinyClassifier(fresh(MethodConfig("loreft", layers=[1], positions="l1")))
    perturb_trainable(first, seed=1, scale=0.3)
    save_adapter(first, tmp_path / "first")
    second = fresh(MethodConfig("loreft", layers=[0], positions="f1", components=("attention",)))
    perturb_trainable(second, seed=2, scale=0.3)
    save_adapter(second, tmp_path / "second")

    model = TinyClassifier(fresh())
    with caplog.at_level("INFO", logger="models.peft"):
        load_adapter(model, tmp_path / "first")
    assert trainable_names(model) == set()  # base frozen by the method; the loaded parts and head frozen
    assert f"{tmp_path / 'first'}: loaded 5 tensors of loreft, frozen (load_adapter(..., trainable=True) to train " \
           "them); trainable params: 0" in caplog.text

    model = TinyClassifier(fresh())
    load_adapter(model, tmp_path / "first", trainable=True)
    first_parts = trainable_names(model)
    assert first_parts == {n for n, _ in model.named_parameters() if ".ffn.default." in n or n.startswith("head.")}
    assert len(first_parts) == 5
    load_adapter(model.gpt, tmp_path / "second", name="second")  # this used to freeze the first adapter
    assert trainable_names(model) == first_parts
    third = TinyClassifier(fresh())
    load_adapter(third, tmp_path / "first")
    load_adapter(third.gpt, tmp_path / "second", name="second", trainable=True)
    assert trainable_names(third) == {n for n, _ in third.named_parameters() if ".attention.second." in n}


def test_a_model_with_two_frozen_adapters_saves_and_reloads_both(tmp_path):
    """save_adapter writes every applied method's tensors, trainable or not, so loaded (frozen) adapters are kept."""
    for name, config, seed in (("first", MethodConfig("loreft", layers=[1], positions="l1"), 1),
                               ("second", MethodConfig("loreft", layers=[0], positions="f1"), 2)):
        model = fresh(config)
        perturb_trainable(model, seed=seed, scale=0.3)
        save_adapter(model, tmp_path / name)
    both = fresh()
    load_adapter(both, tmp_path / "first")
    load_adapter(both, tmp_path / "second", name="second")
    assert trainable_names(both) == set()
    save_adapter(both, tmp_path / "both")
    again = fresh()
    load_adapter(again, tmp_path / "both")
    ids, _ = right_padded([6, 6])
    with torch.no_grad():
        assert torch.equal(again(ids)["last_hidden_state"], both(ids)["last_hidden_state"])
