"""Pretrains a GPT-2 from scratch as a causal language model on plain text, for offline runs that need a model
whose hidden states mean something (no pretrained weights can be downloaded here).

    python -m tasks.pretrain --tokenizer ../shared/gpt2-tokenizer --data-dir ../shared/data --steps 800
    python train_sentiment.py --model runs/pretrain-small/best ...          # then use it like any checkpoint

By default the texts are the course's training texts in --data-dir (SST and CFIMDB sentences, Quora questions,
the sonnets; never a dev or test file); --text FILE trains on plain-text files instead (a blank line separates
documents). Each document ends with <|endoftext|>; the documents are joined and cut into blocks of --context
tokens. A fixed share of the documents (--held-out, chosen by a hash of the text, so a duplicate never lands on
both sides) is held out to measure perplexity. Training: AdamW, warmup then linear decay, gradient clipping,
--resume from <run>/last/ (bit-identical to an uninterrupted run), the lowest held-out loss kept in <run>/best/
in the hub layout with its tokenizer, the history in <run>/log.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.atomic import atomic_save, check_writable
from data.readers import check_file, default_paths, read_paraphrase, read_sentiment, read_sonnets
from models.config import PRESETS, GPT2Config
from models.gpt2 import PRECISION_CHOICES, PRECISION_HELP, GPT2Model, resolve_device, resolve_precision
from models.tokenizer import GPT2Tokenizer, tokenizer_source
from tasks import checkpoint as ckpt
from tasks.cli import HelpFormatter, add_optimizer_arguments, number_in, positive_int, run_reporting_errors, seed_value
from tasks.config import optimizer_problems, seed_problem
from tasks.trainer import TrainingDiverged, build_optimizer, warmup_then_decay

# What the course's data sets contribute: (task, reader of its training file, the texts of one row).
COURSE_TEXTS = (("sst", read_sentiment, lambda e: [e.text]), ("cfimdb", read_sentiment, lambda e: [e.text]),
                ("quora", read_paraphrase, lambda e: [e.sentence1, e.sentence2]),
                ("sonnet", read_sonnets, lambda s: [s.text]))
# Settings that do not change what is trained: a resume may change them.
NOT_IDENTITY = ("output_dir", "device", "threads", "save_every_steps", "resume", "overwrite")


@dataclass
class PretrainConfig:
    preset: str = "small"  # a models/config.py shape; the vocabulary is always the tokenizer's
    n_embd: Optional[int] = None  # overrides of the preset's shape (None: the preset's)
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    context: Optional[int] = None  # tokens per training block and the model's n_positions (None: the preset's)
    texts: Optional[list[str]] = None  # plain-text files; None: the course's training texts in data_dir
    data_dir: str = "data"
    tokenizer: Optional[str] = None  # None: the hub's gpt2 (offline: ../shared/gpt2-tokenizer)
    output_dir: Optional[str] = None  # None: runs/pretrain-<preset>
    held_out: float = 0.05  # share of the documents held out for perplexity
    steps: int = 800  # the budget: README "A small GPT-2 pretrained here" sizes it
    batch_size: int = 16  # blocks per micro-batch
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    dropout: float = 0.1  # also what the saved checkpoint's config says (fine-tuning's --dropout overrides it)
    eval_every_steps: int = 250  # held-out evaluation (and always after the last step)
    max_eval_blocks: Optional[int] = 256  # held-out blocks evaluated (None: all); the same number of train blocks
    save_every_steps: Optional[int] = None  # resume checkpoint (None: at every evaluation)
    seed: int = 11711
    device: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None  # torch's intra-op threads; None: torch's default
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("n_embd", "n_layer", "n_head", "context", "max_eval_blocks", "save_every_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (or unset), got {value}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.held_out < 1:
            problems.append(f"held_out must be in (0, 1), got {self.held_out}")
        problems += optimizer_problems(self.lr, self.warmup_ratio, self.weight_decay, self.max_grad_norm)
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if seed_problem(self.seed):
            problems.append(f"seed {seed_problem(self.seed)}")
        if self.precision not in PRECISION_CHOICES:
            problems.append(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else Path("runs") / f"pretrain-{self.preset}"

    def model_config(self, vocab_size: int) -> GPT2Config:
        shape = {name: getattr(self, name) for name in ("n_embd", "n_layer", "n_head") if getattr(self, name)}
        if self.context is not None:
            shape["n_positions"] = self.context
        try:
            return GPT2Config.preset(self.preset, vocab_size=vocab_size, dropout=self.dropout, **shape)
        except ValueError as error:
            raise ValueError(f"--preset {self.preset} with the given shape flags: {error}") from None

    def identity(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in NOT_IDENTITY}


# ----------------------------------------------------------------------------------------------- data
def course_documents(data_dir: str) -> list[tuple[Path, list[str]]]:
    """(file, its texts) for the training file of each course data set; never a dev or test file."""
    out = []
    for task, read, texts_of in COURSE_TEXTS:
        path = default_paths(task, data_dir)["train"]
        check_file(path)
        out.append((path, [text for row in read(path) for text in texts_of(row)]))
    return out


def plain_documents(paths: Sequence[str]) -> list[tuple[Path, list[str]]]:
    """(file, its documents): the text between blank lines."""
    out = []
    for name in paths:
        path = Path(name)
        check_file(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"--text {path}: not UTF-8 text ({error})") from None
        out.append((path, [doc.strip() for doc in re.split(r"\n[ \t]*\n", text) if doc.strip()]))
    return out


def is_held_out(text: str, share: float) -> bool:
    """Whether a document is held out: by a hash of its text, so that the split does not depend on the seed or
    the file order, and a text that occurs twice is on one side only."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class Corpus:
    train: torch.Tensor  # (blocks, context) token ids
    held_out: torch.Tensor
    sources: list[str]
    documents: dict  # documents per side
    fingerprint: str  # of the training blocks (a resume refuses other ones)


def build_corpus(config: PretrainConfig, tokenizer: GPT2Tokenizer, context: int) -> Corpus:
    files = plain_documents(config.texts) if config.texts else course_documents(config.data_dir)
    streams = {"train": [], "held_out": []}
    documents = {"train": 0, "held_out": 0}
    for _, docs in files:
        for doc in docs:
            side = "held_out" if is_held_out(doc, config.held_out) else "train"
            streams[side].extend(tokenizer.encode(doc))
            streams[side].append(tokenizer.eos_token_id)
            documents[side] += 1
    names = ", ".join(str(path) for path, _ in files)
    blocks = {}
    for side, stream in streams.items():
        count = len(stream) // context
        if count == 0:
            what = "training" if side == "train" else "held-out (raise --held-out)"
            raise ValueError(f"{names}: too little text for one {what} block of --context {context} tokens "
                             f"({len(stream)} tokens, {documents[side]} documents)")
        blocks[side] = torch.tensor(stream[:count * context], dtype=torch.long).view(count, context)
    fingerprint = hashlib.sha256(blocks["train"].numpy().tobytes()).hexdigest()
    return Corpus(blocks["train"], blocks["held_out"], [str(path) for path, _ in files], documents, fingerprint)


def block_order(n_blocks: int, seed: int, positions: range) -> list[int]:
    """The blocks at `positions` of the run's stream of blocks: one random permutation per pass over the data,
    drawn from the seed alone, so that a resumed run reads the same blocks as an uninterrupted one."""
    generator, epoch, permutation, out = torch.Generator().manual_seed(seed), -1, None, []
    for position in positions:
        while epoch < position // n_blocks:
            permutation, epoch = torch.randperm(n_blocks, generator=generator), epoch + 1
        out.append(int(permutation[position % n_blocks]))
    return out


# ----------------------------------------------------------------------------------------------- training
def lm_loss(model: GPT2Model, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a (B, T) batch, computed in fp32."""
    hidden = model(blocks)["last_hidden_state"][:, :-1]
    logits = model.hidden_state_to_token(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    loss_sum: float = 0.0  # training loss since the last evaluation
    loss_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training time, evaluation excluded


@dataclass
class Pretrainer:
    config: PretrainConfig
    history: list = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    best: dict = field(default_factory=lambda: {"loss": None, "step": None})
    status: str = "running"

    def say(self, message: str) -> None:
        tqdm.write(message)

    def setup(self) -> None:
        config = self.config
        self.run_dir = config.run_dir
        self.lock = ckpt.RunLock(self.run_dir)
        restart = ckpt.check_run_dir(self.run_dir, config.resume, config.overwrite)
        self.lock.acquire()
        check_writable(self.run_dir)
        for stale in ckpt.remove_stale_temp_files(self.run_dir):
            self.say(f"  removed {stale}, left by an interrupted write")
        resume = config.resume and not restart
        state = ckpt.load_checkpoint(ckpt.checkpoint_path(self.run_dir), config.identity()) if resume else None
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_source("gpt2", config.tokenizer))
        model_config = config.model_config(self.tokenizer.vocab_size)
        self.corpus = build_corpus(config, self.tokenizer, model_config.n_positions)
        self.fingerprints = {"tokenizer": self.tokenizer.fingerprint(), "train": self.corpus.fingerprint}
        if state is not None:
            ckpt.check_fingerprints(ckpt.checkpoint_path(self.run_dir), state, self.fingerprints, {
                "tokenizer": f"the tokenizer ({tokenizer_source('gpt2', config.tokenizer)})",
                "train": f"the training text ({', '.join(self.corpus.sources)})"})
        if restart:
            ckpt.clear_run_dir(self.run_dir)
        torch.manual_seed(config.seed)
        self.model = GPT2Model(model_config).to(self.device).set_precision(self.precision)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_then_decay(config.steps, round(config.warmup_ratio * config.steps)))
        limit = config.max_eval_blocks or len(self.corpus.held_out)
        self.eval_blocks = {"held_out": self.corpus.held_out[:limit],
                            "train": self.corpus.train[block_order(len(self.corpus.train), config.seed, range(limit))]}
        train, held = self.corpus.train, self.corpus.held_out
        self.say(f"pretraining GPT-2 ({config.preset}: n_embd {model_config.n_embd}, {model_config.n_layer} layers, "
                 f"{model_config.n_head} heads, context {model_config.n_positions}; "
                 f"{model_config.parameter_count():,} parameters) on {', '.join(self.corpus.sources)}")
        self.say(f"  {train.numel():,} training tokens ({len(train)} blocks, {self.corpus.documents['train']} documents), "
                 f"{held.numel():,} held out ({len(held)} blocks, {self.corpus.documents['held_out']} documents); "
                 f"{config.steps} steps of {config.batch_size} x {config.grad_accum} blocks "
                 f"({config.steps * config.batch_size * config.grad_accum / len(train):.2f} passes); lr {config.lr:g}; "
                 f"{self.device} {self.precision}")
        if state is not None:
            self.restore(state)

    # ---- checkpoints
    def save_checkpoint(self) -> None:
        ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir), {
            "identity": self.config.identity(), "fingerprints": self.fingerprints,
            "trainable": {name: p.detach().clone() for name, p in self.model.named_parameters()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": [ckpt.rng_state(self.device)], "progress": asdict(self.progress), "best": dict(self.best),
            "history": self.history})

    def restore(self, state: dict) -> None:
        path = ckpt.checkpoint_path(self.run_dir)
        progress = ckpt.record_from(Progress, state["progress"], path, "progress")
        try:
            ckpt.restore_trainable(self.model, state["trainable"], path)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            ckpt.restore_rng_state(state["rng"][0], self.device)
            best = {"loss": state["best"]["loss"], "step": state["best"]["step"]}
        except ckpt.ResumeError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise ckpt.ResumeError(ckpt.damaged(path, f"it does not fit this run ({error!r})")) from None
        self.progress, self.best, self.history = progress, best, list(state["history"])
        self.say(f"  resumed from {path} at step {progress.step}")

    def save_best(self) -> None:
        best = self.run_dir / "best"
        self.model.save_pretrained(best)
        self.tokenizer.save_pretrained(best)  # so that --model DIR finds its tokenizer

    def write_log(self, final: Optional[dict] = None) -> None:
        log = {"status": self.status, "config": asdict(self.config), "model": self.model.config.to_hf_dict(),
               "parameters": sum(p.numel() for p in self.model.parameters()), "sources": self.corpus.sources,
               "tokens": {"train": self.corpus.train.numel(), "held_out": self.corpus.held_out.numel()},
               "fingerprints": self.fingerprints, "device": str(self.device), "precision": self.precision,
               "best": self.best, "history": self.history}
        if final is not None:
            log["final"] = final
        atomic_save(lambda temp: Path(temp).write_text(json.dumps(log, indent=2) + "\n"), self.run_dir / "log.json")

    # ---- the loop
    @torch.no_grad()
    def evaluate(self, side: str) -> float:
        self.model.eval()
        blocks, total = self.eval_blocks[side], 0.0
        for start in range(0, len(blocks), self.config.batch_size):
            batch = blocks[start:start + self.config.batch_size].to(self.device)
            total += lm_loss(self.model, batch).item() * len(batch)
        return total / len(blocks)

    def train_step(self) -> float:
        config, progress = self.config, self.progress
        self.model.train()
        per_step = config.batch_size * config.grad_accum
        order = block_order(len(self.corpus.train), config.seed, range(progress.step * per_step, (progress.step + 1) * per_step))
        loss_sum = 0.0
        for k in range(config.grad_accum):
            batch = self.corpus.train[order[k * config.batch_size:(k + 1) * config.batch_size]].to(self.device)
            loss = lm_loss(self.model, batch)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        loss = loss_sum / config.grad_accum
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.status = "diverged"
            self.write_log()
            raise TrainingDiverged(f"pretraining stopped: the loss ({loss:.4g}) or its gradient (norm {grad_norm:.4g}) "
                                   f"is not finite at step {progress.step + 1}; lower --lr or raise --warmup-ratio")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.loss_sum += loss
        progress.loss_steps += 1
        progress.tokens += per_step * (self.corpus.train.shape[1] - 1)
        return loss

    def evaluate_and_log(self) -> dict:
        progress = self.progress
        # The running training loss (dropout on) since the last evaluation; none before the first step.
        train_loss = progress.loss_sum / progress.loss_steps if progress.loss_steps else None
        held, train_eval = self.evaluate("held_out"), self.evaluate("train")
        entry = {"step": progress.step, "train_loss": train_loss,
                 "train_ppl": math.exp(min(train_loss, 50)) if train_loss is not None else None,
                 "train_eval_loss": train_eval, "train_eval_ppl": math.exp(min(train_eval, 50)),
                 "held_out_loss": held, "held_out_ppl": math.exp(min(held, 50)), "lr": self.scheduler.get_last_lr()[0],
                 "tokens": progress.tokens, "train_seconds": progress.seconds,
                 "tokens_per_second": progress.tokens / max(progress.seconds, 1e-9)}
        if self.best["loss"] is None or held < self.best["loss"]:
            self.best = {"loss": held, "step": progress.step}
            self.save_best()
        self.history.append(entry)
        progress.loss_sum, progress.loss_steps = 0.0, 0
        running = f"{entry['train_ppl']:.1f} (running), " if train_loss is not None else ""
        self.say(f"step {progress.step}/{self.config.steps}: train ppl {running}"
                 f"{entry['train_eval_ppl']:.1f} (eval), held-out ppl {entry['held_out_ppl']:.1f}"
                 + (f" ({entry['tokens_per_second']:.0f} tokens/s)" if progress.tokens else ""))
        return entry

    def train(self) -> None:
        config, progress = self.config, self.progress
        save_every = config.save_every_steps or config.eval_every_steps
        if not self.history:  # the untrained model's perplexities: what the training is measured against
            self.evaluate_and_log()
        with tqdm(total=config.steps, initial=progress.step, desc="pretrain", leave=False, dynamic_ncols=True,
                  disable=None) as bar:
            while progress.step < config.steps:
                start = time.perf_counter()
                loss = self.train_step()
                progress.seconds += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                last = progress.step == config.steps
                if progress.step % config.eval_every_steps == 0 or last:
                    self.evaluate_and_log()
                    self.write_log()
                if progress.step % save_every == 0 or last:
                    self.save_checkpoint()

    def run(self) -> dict:
        try:
            self.setup()
            try:
                self.train()
            except KeyboardInterrupt:
                self.status = "interrupted"
                self.write_log()
                raise
            except Exception as error:
                if self.status == "running":
                    self.status = "failed"
                    try:
                        self.write_log(final={"error": f"{type(error).__name__}: {error}"})
                    except OSError:
                        pass
                raise
            self.status = "finished"
            final = {"best_step": self.best["step"], "best_held_out_ppl": math.exp(min(self.best["loss"], 50)),
                     **{k: self.history[-1][k] for k in ("train_ppl", "train_eval_ppl", "held_out_ppl")},
                     "model": str(self.run_dir / "best")}
            self.write_log(final)
            self.say(f"pretrained: held-out ppl {final['best_held_out_ppl']:.1f} at step {final['best_step']}; model in "
                     f"{final['model']} (use it with --model {final['model']})")
            return final
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.release()


def pretrain(config: PretrainConfig) -> dict:
    """Pretrains and returns the final perplexities and the model directory (<run>/best)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return Pretrainer(config).run()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m tasks.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=list(PRESETS), default=d.preset, help="the GPT-2 shape (models/config.py)")
    for name, what in (("n-embd", "width"), ("n-layer", "layers"), ("n-head", "attention heads")):
        model.add_argument(f"--{name}", type=positive_int, default=None, help=f"{what} (default: the preset's)")
    model.add_argument("--context", type=positive_int, default=None,
                       help="tokens per training block, and the model's context (default: the preset's n_positions)")
    model.add_argument("--dropout", type=number_in(0, 1), default=d.dropout, help="dropout while pretraining; the "
                       "checkpoint's config records it")
    data = parser.add_argument_group("text")
    data.add_argument("--text", dest="texts", action="append", default=None, metavar="FILE",
                      help="a plain-text file to train on, documents separated by blank lines (repeatable; default: "
                      "the training files of SST, CFIMDB, Quora and the sonnets in --data-dir)")
    data.add_argument("--data-dir", default=d.data_dir, help="directory with the course's data files")
    data.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt (default: the hub's "
                      "gpt2; offline: ../shared/gpt2-tokenizer)")
    data.add_argument("--held-out", type=number_in(0, 1, low_open=True), default=d.held_out,
                      help="share of the documents held out for perplexity")
    data.add_argument("--output-dir", default=None, help="run directory (default: runs/pretrain-<preset>)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps: the budget")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="blocks per micro-batch")
    train.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per step")
    train.add_argument("--lr", type=number_in(0, float("inf"), low_open=True), default=d.lr, help="peak learning rate")
    add_optimizer_arguments(train, d)
    train.add_argument("--eval-every-steps", type=positive_int, default=d.eval_every_steps,
                       help="measure perplexity (and keep the best model) every N steps, and after the last")
    train.add_argument("--max-eval-blocks", type=positive_int, default=d.max_eval_blocks,
                       help="held-out blocks per evaluation (and as many training blocks)")
    train.add_argument("--save-every-steps", type=positive_int, default=None,
                       help="write the resume checkpoint every N steps (default: at every evaluation)")
    train.add_argument("--seed", type=seed_value, default=d.seed, help="seeds the initial weights, the block order "
                       "and dropout")
    train.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    train.add_argument("--precision", choices=PRECISION_CHOICES, default=d.precision, help=PRECISION_HELP)
    train.add_argument("--threads", type=positive_int, default=None,
                       help="intra-op CPU threads (default: torch's, one per core)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the interrupted run in --output-dir")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}
    values["max_grad_norm"] = args.max_grad_norm or None  # 0 turns clipping off
    try:
        return PretrainConfig(**values)
    except ValueError as error:
        parser.error(str(error))


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse_args(argv)
    return run_reporting_errors(lambda: pretrain(config), config.run_dir)


if __name__ == "__main__":
    sys.exit(main())
