"""Sonnet generation: language-model fine-tuning on Shakespeare's sonnets, then continuing held-out sonnets
from their first three lines, scored with chrF against the true sonnets.

A training sonnet is tokenised as its first three lines, then the rest, then <|endoftext|> (so the model
learns where a sonnet ends). The first three lines are the "prompt" of a training sequence: interventions
that act on prompt positions (ReFT's first/last tokens) act on the same tokens in training as when they
continue a held-out sonnet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from sacrebleu.metrics import CHRF
from torch import nn

from data.readers import Sonnet, read_sonnets, write_sonnets
from models.generation import SamplingConfig, generate
from models.tokenizer import pad_sequences
from tasks.config import TrainConfig
from tasks.task import Example, Task, TaskData

PROMPT_LINES = 3


def split_prompt(text: str) -> tuple[str, str]:
    """(the first three lines, each ending in a newline; the rest of the sonnet)."""
    lines = text.strip("\n").split("\n")
    return "".join(line + "\n" for line in lines[:PROMPT_LINES]), "".join(line + "\n" for line in lines[PROMPT_LINES:])


class SonnetTask(Task):
    name = "sonnet"
    metric = "chrf"
    no_head = "its LM head is the tied token embedding"

    def load(self, config: TrainConfig, tokenizer, max_length: int) -> TaskData:
        self.tokenizer = tokenizer  # generation decodes with it
        paths = config.data_paths()
        train, truncated = [], 0
        for sonnet in read_sonnets(paths["train"])[:config.example_limit("train")]:
            prompt, rest = split_prompt(sonnet.text)
            prompt_ids = tokenizer.encode(prompt)
            ids = prompt_ids + tokenizer.encode(rest) + [tokenizer.eos_token_id]
            truncated += len(ids) > max_length
            train.append(Example(id=str(sonnet.number), input_ids=ids[:max_length],
                                 prompt_length=min(len(prompt_ids), max_length)))
        references, notes = {}, []
        true_path = paths.get("dev_true")
        if true_path is not None and true_path.is_file():
            references = {s.number: s.text for s in read_sonnets(true_path)}
        elif true_path is not None:
            notes.append(f"  note: no true sonnets at {true_path}, so no dev chrF (the dev prompts are still continued)")
        dev = self.prompts(paths["dev"], tokenizer, max_length, references)[:config.example_limit("dev")]
        unscored = [e.id for e in dev if e.label is None]
        if references and unscored:
            raise ValueError(f"{true_path}: holds no true text for dev sonnet(s) {', '.join(unscored)} of {paths['dev']}; "
                             "chrF needs every one (use the two files that belong together)")
        splits = {"train": train, "dev": dev,
                  "test": self.prompts(paths["test"], tokenizer, max_length, {})[:config.example_limit("test")]
                  if paths["test"].is_file() else []}
        return TaskData(splits=splits, paths=paths, truncated={"train": truncated}, notes=notes)

    @staticmethod
    def prompts(path: Path, tokenizer, max_length: int, references: dict) -> list[Example]:
        examples = []
        for sonnet in read_sonnets(path):
            prompt, _ = split_prompt(sonnet.text)
            ids = tokenizer.encode(prompt)
            if len(ids) >= max_length:
                raise ValueError(f"{path}: sonnet {sonnet.number}'s first lines take {len(ids)} tokens, leaving no room "
                                 f"to continue within --max-length {max_length}")
            examples.append(Example(id=str(sonnet.number), input_ids=ids, text=prompt,
                                    label=references.get(sonnet.number)))
        return examples

    def build_model(self, gpt: nn.Module, tokenizer) -> nn.Module:
        return gpt  # the language model itself: its LM head is the tied token embedding

    def collate(self, examples: Sequence[Example], device: torch.device) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([e.input_ids for e in examples], device=device)
        prompt_length = torch.tensor([e.prompt_length or e.length for e in examples], device=device)
        prompt_mask = torch.arange(ids.shape[1], device=device)[None, :] < prompt_length[:, None]
        return {"input_ids": ids, "attention_mask": mask, "prompt_mask": prompt_mask}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy summed over the real tokens (the vocabulary projection skips padding)."""
        hidden = model(batch["input_ids"], batch["attention_mask"], prompt_mask=batch["prompt_mask"])["last_hidden_state"]
        predicted = batch["attention_mask"][:, 1:].bool()
        logits = model.hidden_state_to_token(hidden[:, :-1][predicted])
        return F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][predicted], reduction="sum")

    def loss_terms(self, example: Example) -> int:
        return example.length - 1

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: Sequence[Example], config: TrainConfig, device: torch.device,
                progress=None) -> list[str]:
        """Each prompt followed by a sampled continuation. The generator restarts from the seed at every call,
        so that epochs are compared on the same random draws."""
        generator = torch.Generator(device).manual_seed(config.seed)
        eos = self.tokenizer.eos_token_id
        texts = []
        for start in range(0, len(examples), config.eval_batch_size):
            batch = examples[start:start + config.eval_batch_size]
            room = model.input_capacity - max(e.length for e in batch)  # a method's virtual tokens take room too
            sampling = SamplingConfig(max_new_tokens=min(config.max_new_tokens, room), do_sample=True,
                                      temperature=config.temperature, top_p=config.top_p, stop_token_id=eos)
            new_tokens = generate(model, [e.input_ids for e in batch], sampling, pad_token_id=eos, generator=generator)
            # A checkpoint whose embedding is padded beyond the tokenizer (to 50304, say) could sample an id no
            # text maps to: such ids are dropped rather than crash the decoding.
            vocabulary = self.tokenizer.vocab_size
            texts.extend(e.text + self.tokenizer.decode([t for t in tokens if t < vocabulary])
                         for e, tokens in zip(batch, new_tokens))
            if progress is not None:
                progress.update(len(batch))
        return texts

    def metrics(self, examples: Sequence[Example], predictions: list) -> dict[str, float]:
        if not examples or any(e.label is None for e in examples):
            return {}
        return {"chrf": CHRF().corpus_score(predictions, [[e.label for e in examples]]).score}

    def prediction_path(self, config: TrainConfig, split: str) -> Path:
        suffix = "-dev" if split == "dev" else ""
        return Path(config.predictions_dir) / f"{config.method_label}-generated-sonnets{suffix}.txt"

    def write_predictions(self, path: Path, examples: Sequence[Example], predictions: list) -> None:
        write_sonnets(path, [Sonnet(int(e.id), text) for e, text in zip(examples, predictions)])

    def describe(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:.2f}" for name, value in metrics.items())
