"""The fine-tuning tasks (sentiment: sst / cfimdb, paraphrase: quora, sonnet) and the training loop they share.

    from tasks import get_task
    from tasks.trainer import run_training
"""
from __future__ import annotations

from data.readers import TASK_FILES

TASK_NAMES = tuple(TASK_FILES)  # sst, cfimdb, quora, sonnet: the tasks whose data files data/readers.py knows


def get_task(name: str):
    """The Task object for a task name (imported lazily: each task pulls in only what it needs)."""
    if name in ("sst", "cfimdb"):
        from tasks.sentiment import SentimentTask

        return SentimentTask(name)
    if name == "quora":
        from tasks.paraphrase import ParaphraseTask

        return ParaphraseTask()
    if name == "sonnet":
        from tasks.sonnet import SonnetTask

        return SonnetTask()
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
