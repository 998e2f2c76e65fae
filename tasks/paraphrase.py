"""Paraphrase detection (Quora Question Pairs) as a cloze: the prompt asks whether two questions mean the same
thing, and GPT-2's next-token logits for "no" / "yes" decide.

The decision is a 2-row linear head on the hidden state at the last prompt token, initialised from the tied
embedding rows of "no" and "yes" (bias zero): before training it computes exactly the language model's
next-token logits restricted to those two tokens, and every method (last-linear-layer included) can train it.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from data.readers import PARAPHRASE_COLUMN, read_paraphrase
from tasks.classification import ClassificationTask, LastTokenClassifier

# The prompt around the two questions, in three pieces: before question 1, between them, after question 2.
PROMPT = ('Question 1: "', '"\nQuestion 2: "', '"\nAre these questions asking the same thing?\n')
# Head row i answers label i (is_duplicate 0 / 1). The prompt ends with a newline, so the answer starts a line
# and has no leading space: "no" 3919 and "yes" 8505 in GPT-2's vocabulary, the course's tokens.
ANSWERS = ("no", "yes")


def answer_token_ids(tokenizer) -> list[int]:
    ids = []
    for word in ANSWERS:
        encoded = tokenizer.encode(word)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits {word!r} into {len(encoded)} tokens; the cloze needs it as one token")
        ids.extend(encoded)
    return ids


def encode_pair(tokenizer, question1: str, question2: str, max_length: int) -> tuple[list[int], bool]:
    """The prompt's token ids; when it is longer than max_length the questions are cut (the longer one first),
    never the instruction. Returns (ids, whether a question was cut)."""
    ids = tokenizer.encode(PROMPT[0] + question1 + PROMPT[1] + question2 + PROMPT[2])
    if len(ids) <= max_length:
        return ids, False
    # Encoded piece by piece so that each question can be cut on a token boundary.
    before, between, after = (tokenizer.encode(piece) for piece in PROMPT)
    first, second = tokenizer.encode(question1), tokenizer.encode(question2)
    budget = max_length - len(before) - len(between) - len(after)
    if budget < 2:
        raise ValueError(f"--max-length {max_length} is too short for the paraphrase prompt, whose instruction alone "
                         f"takes {max_length - budget} tokens")
    keep_first = min(len(first), max(budget // 2, budget - len(second)))
    keep_second = min(len(second), budget - keep_first)
    return before + first[:keep_first] + between + second[:keep_second] + after, True


class ParaphraseTask(ClassificationTask):
    name, file_stem = "quora", "para"
    metric = "accuracy"
    num_labels = 2
    prediction_column = PARAPHRASE_COLUMN

    def read_rows(self, path: Path, require_labels: bool) -> list:
        return read_paraphrase(path, require_labels=require_labels)

    def encode_row(self, tokenizer, row, max_length: int) -> tuple[list[int], bool]:
        return encode_pair(tokenizer, row.sentence1, row.sentence2, max_length)

    def build_model(self, gpt: nn.Module, tokenizer) -> nn.Module:
        rows = gpt.wte.weight.detach()[answer_token_ids(tokenizer)].float()
        return LastTokenClassifier(gpt, self.num_labels, init_weight=rows)
