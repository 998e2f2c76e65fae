"""The command line the three train_*.py scripts share: one argparse builder, flag checks that name the flag,
and `main`, which turns the errors a user can fix into one clear line instead of a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Callable, Optional, Sequence

from data.course import COURSE_MODES, MODE_FAMILIES
from models.gpt2 import PRECISION_CHOICES, PRECISION_HELP
from models.methods import (
    EXAMPLE_COMBINATION,
    MethodConfig,
    OPTIONS,
    Option,
    OptionError,
    flag_options,
    get_method,
    method_names,
    parse_combination,
    registered_methods,
)
from models.peft import check_combination
from tasks.config import TrainConfig, seed_problem
from tasks.feature_cache import parse_size
from tasks.trainer import TrainingDiverged, run_training

SCRIPTS = {"sentiment": ("sst", "cfimdb"), "paraphrase": ("quora",), "sonnet": ("sonnet",)}
DESCRIPTIONS = {
    "sentiment": "Fine-tune GPT-2 to classify sentiment (SST-5: 5 classes, CFIMDB: 2) from its last token.",
    "paraphrase": "Fine-tune GPT-2 to detect paraphrases (Quora) as a yes/no cloze on its next-token logits.",
    "sonnet": "Fine-tune GPT-2 on Shakespeare's sonnets and continue held-out sonnets from their first 3 lines.",
}


def script_of(task: str) -> str:
    for script, tasks in SCRIPTS.items():
        if task in tasks:
            return script
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(t for ts in SCRIPTS.values() for t in ts)}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = True):
    """A float checker for the range low..high (open or closed ends), with a message naming the range."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or value != value:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text!r}")
        return value
    return check


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if seed_problem(value):
        raise argparse.ArgumentTypeError(seed_problem(value))
    return value


def size_in_bytes(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except unset ones (their help says what happens instead) and ones the help already
    names."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(script: str, default_task: Optional[str] = None) -> argparse.ArgumentParser:
    tasks = SCRIPTS[script]
    defaults = TrainConfig(task=tasks[0])
    parser = ScriptParser(description=DESCRIPTIONS[script], formatter_class=HelpFormatter)
    if len(tasks) > 1:
        parser.add_argument("--task", choices=tasks, default=default_task or tasks[0], help="which data set")
    else:
        parser.set_defaults(task=tasks[0])
    inputs = parser.add_argument_group("model and data")
    inputs.add_argument("--model", default=defaults.model,
                        help="hub name (gpt2, gpt2-medium, ...), local checkpoint directory, or random:<size>")
    inputs.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt (default: the model "
                        "directory if it has them, else the hub's gpt2; offline: ../shared/gpt2-tokenizer)")
    inputs.add_argument("--data-dir", default=defaults.data_dir, help="directory with the course's data files")
    inputs.add_argument("--output-dir", default=None, help="run directory for the log and checkpoints "
                        "(default: runs/<task>-<method>)")
    inputs.add_argument("--predictions-dir", default=defaults.predictions_dir, help="where prediction files go")
    inputs.add_argument("--course-names", action="store_true", help="name the prediction files as the CS224n "
                        "course does (full-model-sst-dev-out.csv, para-dev-output.csv, generated_sonnets.txt) and "
                        "write its label values (Quora: the token ids of no / yes, 3919 / 8505)")
    inputs.add_argument("--max-length", type=positive_int, default=None,
                        help="truncate inputs to this many tokens (default: the model context)")
    inputs.add_argument("--max-train-examples", type=positive_int, default=None,
                        help="train on the first N examples only (quick runs)")
    inputs.add_argument("--max-eval-examples", type=positive_int, default=None,
                        help="evaluate and predict on the first N dev / test examples only (quick runs)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="passes over the training data")
    train.add_argument("--lr", type=number_in(0, float("inf"), low_open=True), default=None,
                       help="peak learning rate (default: 1e-5 for full fine-tuning, 1e-3 for the other methods)")
    train.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                       help="examples per micro-batch, over all processes together")
    train.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum,
                       help="micro-batches per optimizer step")
    train.add_argument("--eval-batch-size", type=positive_int, default=defaults.eval_batch_size,
                       help="examples per batch when predicting (sonnets: prompts generated together)")
    add_optimizer_arguments(train, defaults)
    train.add_argument("--dropout", type=number_in(0, 1), default=None,
                       help="GPT-2's dropout rate (default: the checkpoint's, 0.1)")
    train.add_argument("--seed", type=seed_value, default=defaults.seed,
                       help="seeds the initial weights, the batch order, dropout and sampling")
    train.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    train.add_argument("--precision", choices=PRECISION_CHOICES, default=defaults.precision, help=PRECISION_HELP)
    train.add_argument("--threads", type=positive_int, default=None,
                       help="intra-op CPU threads (default: torch's, one per core); 1 is often faster on a small "
                       "machine that runs other work too (see README)")
    train.add_argument("--no-cache", dest="cache", action="store_false",
                       help="recompute the frozen layers below the first trainable one every epoch, with dropout in "
                       "them (default: computed once per example and reused, dropout off there)")
    train.add_argument("--cache-memory", type=size_in_bytes, default=None,
                       help="RAM for that cache, such as 4G or 512M, beyond which it goes to a memory-mapped file in "
                       "the run directory (default: a quarter of the machine's memory)")
    train.add_argument("--patience", type=positive_int, default=None,
                       help="early stopping: stop after N evaluations without a better dev metric")
    train.add_argument("--eval-every", type=positive_int, default=defaults.eval_every,
                       help="evaluate on dev every N epochs (and after the last)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=positive_int, default=None,
                        help="stop after N optimizer steps in all, instead of after --epochs (the epochs and the "
                        "learning-rate schedule then follow from N)")
    budget.add_argument("--budget-seconds", type=number_in(0, float("inf"), low_open=True), default=None,
                        help="stop once training (evaluation excluded) has taken S seconds; --epochs stays the upper "
                        "bound and spans the learning-rate schedule")
    train.add_argument("--save-every-steps", type=positive_int, default=None,
                       help="also write the resume checkpoint every N optimizer steps (it is always written after "
                       "each epoch)")
    train.add_argument("--log-every", type=positive_int, default=defaults.log_every,
                       help="write loss, learning rate, tokens/s and gradient norm to <run>/steps.jsonl every N "
                       "optimizer steps")
    train.add_argument("--tensorboard", action="store_true",
                       help="also write them to TensorBoard in <run>/tensorboard/ (needs: pip install tensorboard)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the interrupted run in --output-dir")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")

    if script == "sonnet":
        generation = parser.add_argument_group("generation")
        generation.add_argument("--temperature", type=number_in(0, float("inf"), low_open=True),
                                default=defaults.temperature, help="sampling temperature")
        generation.add_argument("--top-p", type=number_in(0, 1, low_open=True, high_open=False), default=defaults.top_p,
                                help="nucleus sampling: sample among the most likely tokens holding this much mass")
        generation.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                                help="the longest continuation (generation also stops at <|endoftext|>)")
    add_method_arguments(parser)
    add_course_arguments(parser, script)
    return parser


# The CS224n starter's per-file flags of each script: flag -> (TrainConfig field, split).
COURSE_FILE_FLAGS = {
    "sentiment": {},
    "paraphrase": {"--para_train": ("data_files", "train"), "--para_dev": ("data_files", "dev"),
                   "--para_test": ("data_files", "test"), "--para_dev_out": ("prediction_files", "dev"),
                   "--para_test_out": ("prediction_files", "test")},
    "sonnet": {"--sonnet_path": ("data_files", "train"), "--held_out_sonnet_path": ("data_files", "test"),
               "--sonnet_out": ("prediction_files", "test")},
}
# The course's spelling of flags this project has: the same setting, checked the same way.
COURSE_ALIASES = {"--batch_size": "--batch-size", "--hidden_dropout_prob": "--dropout", "--model_size": "--model",
                  "--top_p": "--top-p"}


def add_course_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """The CS224n starter's flags. Aliases are arguments of their own (so that an error names the flag as typed)
    writing the same setting, with no default of their own."""
    group = parser.add_argument_group("the CS224n starter's flags", "accepted so that the course's commands run")
    for alias, ours in COURSE_ALIASES.items():
        action = parser._option_string_actions.get(ours)
        if action is not None:  # --top_p: the sonnet script only
            group.add_argument(alias, dest=action.dest, type=action.type, choices=action.choices,
                               default=argparse.SUPPRESS, metavar=action.metavar, help=ours)
    group.add_argument("--fine-tune-mode", choices=COURSE_MODES, default=None,
                       help="; ".join(f"{mode}: --method {course_method(mode)}" for mode in COURSE_MODES))
    group.add_argument("--use_gpu", dest="device", action="store_const", const="cuda", help="--device cuda")
    for flag, (field, split) in COURSE_FILE_FLAGS[script].items():
        what = "data file" if field == "data_files" else "predictions file"
        group.add_argument(flag, dest=course_dest(flag), default=None, metavar="PATH", help=f"the {split} {what}")


def course_method(mode: str) -> str:
    """The method of a course fine-tune mode: the registered one of the mode's family (data/course.py)."""
    return next(m.name for m in registered_methods() if m.family == MODE_FAMILIES[mode])


def course_dest(flag: str) -> str:
    return "course_" + flag.lstrip("-")


PART_FLAG = re.compile(r"--([A-Za-z0-9_-]+)\.([a-z][a-z0-9-]*)(?:=(.*))?", re.DOTALL)  # --PART.FLAG[=VALUE]


def combination_help() -> str:
    """--method's help, its examples from the registry's example combination."""
    example = EXAMPLE_COMBINATION
    part = example.split("+")[-1]
    return (f"what to train: one method, or a combination joined with '+' (e.g. {example}): at most one weight-space "
            "method, any number of ReFT-family adapters, at most one soft-prompt method; two parts of one method need "
            f"names after ':' ({part}:early+{part}:late). A method flag applies to every part that takes it; "
            f"--PART.FLAG VALUE (--{part}.rank 1, --late.positions l1) sets it for one part, PART being its method "
            "or its name")


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser: argparse, plus a part's own method flags, --PART.FLAG [VALUE] (--loreft.rank 1,
    --loreft.untie-positions, --late.positions=l1), which argparse cannot declare ahead of the --method value.
    They are taken out first and left in `part_flags`, (part, option, raw value, the flag as typed) each, for
    method_config_from_args."""

    def parse_known_args(self, args=None, namespace=None):
        tokens = list(sys.argv[1:] if args is None else args)
        rest, part_flags, i = [], [], 0
        while i < len(tokens):
            match = PART_FLAG.fullmatch(tokens[i])
            if match is None:
                rest.append(tokens[i])
                i += 1
                continue
            part, flag, value = match.groups()
            typed = f"--{part}.{flag}"
            option = next((o for o in flag_options() if o.flag == f"--{flag}"), None)
            if option is None:
                self.error(f"{typed}: --{flag} is not a method flag; a part's own flag is --PART.FLAG with FLAG one of "
                           + ", ".join(o.flag.lstrip("-") for o in flag_options()))
            if option.switch is not None:
                if value is not None:
                    self.error(f"argument {typed}: ignored explicit argument {value!r}")
                value = option.switch
            elif value is None:
                if i + 1 == len(tokens) or tokens[i + 1].startswith("--"):
                    self.error(f"argument {typed}: expected one argument")
                i += 1
                value = tokens[i]
            part_flags.append((part, option, value, typed))
            i += 1
        namespace, extras = super().parse_known_args(rest, namespace)
        namespace.part_flags = part_flags
        return namespace, extras


def method_text(text: str) -> str:
    """--method's value: one method or a combination of known methods."""
    try:
        parse_combination(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid choice: {error} (a combination joins methods with '+', e.g. "
                                         f"{EXAMPLE_COMBINATION})") from None
    return text


def add_optimizer_arguments(group, defaults) -> None:
    """The schedule and optimizer flags the training scripts and pretraining share (defaults: a config object with
    warmup_ratio, weight_decay and max_grad_norm)."""
    group.add_argument("--warmup-ratio", type=number_in(0, 1), default=defaults.warmup_ratio,
                       help="fraction of the steps with a linear warmup; then linear decay to zero")
    group.add_argument("--weight-decay", type=number_in(0, float("inf")), default=defaults.weight_decay,
                       help="AdamW's decoupled weight decay, on weight matrices only")
    group.add_argument("--max-grad-norm", type=number_in(0, float("inf")), default=defaults.max_grad_norm,
                       help="clip the gradient norm (0: no clipping)")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--method and one flag per method option, all from the registry (models/methods.py). Option flags default
    to None, so that what was not given takes the chosen method's default and what was given can be checked."""
    group = parser.add_argument_group("fine-tuning method")
    group.add_argument("--method", default=MethodConfig().method, type=method_text,
                       metavar="{" + ",".join(method_names()) + "}[+...]", help=combination_help())
    for option in flag_options():
        help = f"{option.help} ({defaults_by_method(option.name)})"
        if option.switch is not None:
            group.add_argument(option.flag, dest=option_dest(option), action="store_const", const=option.switch,
                               default=None, help=help)
        else:
            group.add_argument(option.flag, dest=option_dest(option), default=None, choices=option.choices, help=help)


def option_dest(option) -> str:
    """The argparse attribute of an option's flag: --lora-targets -> lora_targets."""
    return option.flag.lstrip("-").replace("-", "_")


def defaults_by_method(name: str) -> str:
    """'default 8 for lora, reft; 4 for loreft, noreft, direft': each method's default for one option."""
    groups: dict[str, list[str]] = {}
    for method in registered_methods():
        if name in method.options:
            groups.setdefault(OPTIONS[name].describe(method.options[name]), []).append(method.name)
    if len(groups) == 1:
        (default, users), = groups.items()
        return f"{', '.join(users)}; default {default}"
    return "default " + "; ".join(f"{default} for {', '.join(users)}" for default, users in groups.items())


def method_config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None
                            ) -> MethodConfig | list[MethodConfig]:
    """The MethodConfig of add_method_arguments' flags, or for a combination (--method lora+loreft) the list of
    its parts' (models/registry.py). A flag applies to every part that takes it; --PART.FLAG (ScriptParser) sets
    it for one part; each ReFT-family part takes the adapter name parse_combination gives it. A flag no part
    takes, a bad value or a combination that is not allowed is a command-line error naming the flag (a
    ValueError without a parser)."""
    def fail(message: str):
        if parser is not None:
            parser.error(message)
        raise ValueError(message)

    text = args.method
    try:
        named = parse_combination(text)
    except ValueError as error:
        fail(f"--method {error}")
    labels = [name or method for method, name in named]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        fail(f"--method {text}: two parts are called {repeated[0]!r}; name them apart after ':', e.g. "
             f"{repeated[0]}:early+{repeated[0]}:late")
    takes = [get_method(method).options for method, _ in named]
    options: list[dict] = [{} for _ in named]
    given: list[dict] = [{} for _ in named]  # option -> the flag that set it, for messages
    for option in flag_options():  # a flag given once: every part that takes it
        raw = getattr(args, option_dest(option), None)
        if raw is None:
            continue
        takers = [i for i, options_of in enumerate(takes) if option.name in options_of]
        if not takers:
            fail(f"{option.flag} does not apply to method {text!r}")
        value = flag_value(option, raw, option.flag, fail)
        for i in takers:
            options[i][option.name], given[i][option.name] = value, option.flag
    for label, option, raw, typed in getattr(args, "part_flags", []):  # --PART.FLAG: that part only
        if label not in labels:
            fail(f"{typed}: --method {text} has no part called {label!r} (its parts: {', '.join(labels)})")
        i = labels.index(label)
        if option.name not in takes[i]:
            fail(f"{typed}: {option.flag} does not apply to method {named[i][0]!r}")
        options[i][option.name], given[i][option.name] = flag_value(option, raw, typed, fail), typed
    parts = []
    for (method, name), chosen, flags in zip(named, options, given):
        if name is not None:
            chosen["name"] = name
        try:
            parts.append(MethodConfig(method, **chosen))
        except OptionError as error:
            fail(f"{flags.get(error.option.name, error.option.flag)} {error.detail}")
    try:
        check_combination(parts)
    except ValueError as error:
        fail(f"--method {error}")
    return parts[0] if len(parts) == 1 else parts


def flag_value(option: Option, raw, flag: str, fail):
    """A method flag's value, parsed (a switch's is the value it sets); a bad one fails naming `flag`."""
    if option.switch is not None:
        return raw
    try:
        return option.parse(raw)
    except ValueError as error:
        fail(f"{flag} {error}")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    mode = getattr(args, "fine_tune_mode", None)
    if mode is not None:
        if args.method not in (MethodConfig().method, course_method(mode)):
            parser.error(f"--fine-tune-mode {mode} means --method {course_method(mode)}, not {args.method}")
        args.method = course_method(mode)
    method = method_config_from_args(args, parser)
    # Flags are named after TrainConfig's fields; a script without some flags (sampling) keeps their defaults.
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name != "method" and hasattr(args, f.name)}
    fields["max_grad_norm"] = args.max_grad_norm or None  # 0 turns clipping off
    for flags in COURSE_FILE_FLAGS.values():
        for flag, (field, split) in flags.items():
            if getattr(args, course_dest(flag), None) is not None:
                fields.setdefault(field, {})[split] = getattr(args, course_dest(flag))
    try:
        return TrainConfig(method=method, **fields)
    except ValueError as error:
        parser.error(str(error))


def parse_args(task: str, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The TrainConfig that `train_<script>.py argv...` would run for `task`."""
    parser = build_parser(script_of(task), default_task=task)
    return config_from_args(parser.parse_args(argv), parser)


def main(script: str, argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(script)
    config = config_from_args(parser.parse_args(argv), parser)
    return run_reporting_errors(lambda: run_training(config.task, config), config.run_dir)


def run_reporting_errors(run: Callable[[], object], run_dir) -> int:
    """Runs a training command and turns what a user can fix into one line and an exit status: 130 for Ctrl-C
    (with how to continue), 1 for bad data (DataFormatError), a checkpoint or adapter that does not fit
    (CheckpointError, ResumeError), a run directory in use, a missing file or an unreachable hub (OSError), or a
    diverging run."""
    try:
        run()
    except KeyboardInterrupt:
        print(f"\ninterrupted; to continue, run the same command with --resume (checkpoint in {run_dir}/last)",
              file=sys.stderr)
        return 130
    except (TrainingDiverged, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
