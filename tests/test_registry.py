"""The method registry (models/registry.py, models/methods.py): a method declared in one entry is known to
MethodConfig, the command line, compare.py and the adapter files without editing anything else; the README's
tables are the registry's."""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import registry
from models.method_table import combination_note, gpt2_trainable_count, method_table, option_table
from models.methods import MethodConfig, get_method, method_names
from models.peft import apply_method, load_adapter, save_adapter
from tasks.cli import build_parser, parse_args
from tests.fixtures.models import random_model
from tests.fixtures.task_files import base_args, run_script

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]

# A method as a user would add one: its module (here inline, in a real project a file under modules/) and one
# registry entry with a new option. Written to a file so that a fresh process (compare.py's) can import it.
PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn

    from models.methods import Method, Option, define_option, finite_number, parse_float, register_method


    class OutputGain(nn.Module):
        """A trained per-channel gain on a layer's output; starts as the identity when gain_init is 1."""

        def __init__(self, layer, dim, gain_init):
            super().__init__()
            self.layer = layer.requires_grad_(False)
            self.gain = nn.Parameter(torch.full((dim,), gain_init))

        def forward(self, x, ctx):
            return self.layer(x, ctx) * self.gain


    def add_gains(gpt, config, layers):
        for index in layers:
            gpt.h[index] = OutputGain(gpt.h[index], gpt.config.n_embd, config.gain_init)


    define_option(Option("gain_init", "the gain's initial value", "--gain-init", parse_float, finite_number))
    register_method(Method("gain", "a gain on each chosen layer's output", add_gains,
                           {"layers": None, "gain_init": 1.0}, lr=5e-3))
''')


@pytest.fixture
def gain_method(tmp_path, monkeypatch):
    """Registers the plugin's 'gain' method for one test, then leaves the registry as it was."""
    options, methods = dict(registry.OPTIONS), dict(registry.METHODS)
    (tmp_path / "gain_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("gain_plugin", None)
    importlib.import_module("gain_plugin")  # registers the method, as a user's own module would

    yield "gain"
    sys.modules.pop("gain_plugin", None)
    registry.OPTIONS.clear(), registry.OPTIONS.update(options)
    registry.METHODS.clear(), registry.METHODS.update(methods)


def test_a_registered_method_is_a_method_config_with_its_defaults_and_checks(gain_method):
    config = MethodConfig("gain", layers=[1])
    assert config.to_dict() == {"method": "gain", "layers": [1], "gain_init": 1.0}
    assert MethodConfig.from_dict(config.to_dict()) == config and config.spec.lr == 5e-3
    with pytest.raises(ValueError, match="gain_init must be a finite number, got nan"):
        MethodConfig("gain", gain_init=float("nan"))
    with pytest.raises(ValueError, match="option 'gain_init' does not apply to method 'lora'"):
        MethodConfig("lora", gain_init=2.0)
    assert "gain" in method_names() and gpt2_trainable_count("gain") == 12 * 768


def test_a_registered_method_has_its_command_line_flags(gain_method, capsys):
    config = parse_args("sst", ["--method", "gain", "--gain-init", "1.5", "--layers", "0"])
    assert config.method == MethodConfig("gain", gain_init=1.5, layers=[0]) and config.learning_rate == 5e-3
    assert str(config.run_dir) == "runs/sst-gain"
    help_text = build_parser("sentiment").format_help()
    assert "--gain-init" in help_text and "gain" in help_text.split("--method")[1].split("\n")[0]
    for argv, message in ([["--method", "lora", "--gain-init", "2"], "--gain-init does not apply to method 'lora'"],
                          [["--method", "gain", "--gain-init", "x"], "--gain-init must be a number, got 'x'"],
                          [["--method", "gain", "--gain-init", "inf"], "--gain-init must be a finite number"]):
        with pytest.raises(SystemExit):
            parse_args("sst", argv)
        assert message in capsys.readouterr().err


def test_a_registered_method_saves_and_reloads_exactly(gain_method, tmp_path):
    torch.manual_seed(0)
    model = apply_method(random_model("tiny"), MethodConfig("gain", gain_init=0.5, layers=[1]))
    with torch.no_grad():
        model.h[1].gain.add_(torch.randn(64))
    ids = torch.randint(0, 1000, (2, 7))
    expected = model(ids)["last_hidden_state"]
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["methods"] == [{"method": "gain", "layers": [1], "gain_init": 0.5}] and saved["parameters"] == 64
    torch.manual_seed(0)
    fresh = load_adapter(random_model("tiny"), tmp_path / "adapter")
    assert torch.equal(fresh(ids)["last_hidden_state"], expected)


def test_compare_routes_a_registered_methods_flags(gain_method, tmp_path, task_files):
    from compare import parse_command

    shared = base_args(tmp_path, task_files, method=None, output_dir=None, predictions_dir=None)
    _, runs = parse_command(["--task", "sst", "--methods", "gain,lora", "--output-dir", str(tmp_path), *shared,
                             "--gain-init", "2", "--rank", "2"])
    configs = {run.variant.name: run.config for run in runs}
    assert configs["gain"].method == MethodConfig("gain", gain_init=2.0)
    assert configs["lora"].method == MethodConfig("lora", rank=2)


@pytest.mark.slow
def test_compare_trains_a_registered_method_in_a_fresh_process(gain_method, tmp_path, task_files, capsys):
    """compare.py's child processes import the module that registered the method."""
    from compare import main

    shared = base_args(tmp_path, task_files, method=None, output_dir=None, predictions_dir=None, max_train_examples=8,
                       max_eval_examples=6)
    code = main(["--task", "sst", "--methods", "gain", "--output-dir", str(tmp_path / "cmp"), *shared, "--layers", "1"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"][0]
    assert run["error"] is None and run["result"]["method"] == {"method": "gain", "layers": [1], "gain_init": 1.0}
    assert run["result"]["trainable_params"] == 64 + 5 * 64 + 5  # one layer's gain and the SST head


def test_training_script_runs_a_registered_method(gain_method, tmp_path, task_files):
    code, out, err = run_script("sentiment", base_args(tmp_path, task_files, method="gain", layers="0",
                                                       max_train_examples=4, max_eval_examples=4))
    assert code == 0, err
    assert f"trainable params: {64 + 5 * 64 + 5:,}" in out


def test_registry_refuses_conflicting_declarations():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(get_method("lora"))
    with pytest.raises(ValueError, match="flag --rank already belongs to option 'rank'"):
        registry.define_option(registry.Option("rung", "x", "--rank"))
    with pytest.raises(ValueError, match="names options that are not defined: nope"):
        registry.register_method(registry.Method("x", "x", lambda *a: None, {"nope": 1}))
    with pytest.raises(ValueError, match="stacks, so it needs the 'name' option"):
        registry.register_method(registry.Method("x", "x", lambda *a: None, {}, stacks=True))
    assert "x" not in method_names()


def test_readme_tables_are_the_registrys():
    """The README's method and flag tables and its combinations note are `python -m models.method_table`'s output,
    row for row."""
    readme = README.read_text()
    for table in (method_table(), combination_note(), option_table()):
        assert table in readme, f"README is out of date; paste `python -m models.method_table`:\n{table}"
