"""The CS224n GPT-2 project's data files: readers and writers (`data.readers`) and, for users with internet
access, `python -m data.download`. Data files themselves live in data/ (or --data-dir) and are never
committed."""
from data.atomic import atomic_save, atomic_write
from data.readers import (
    PARAPHRASE_COLUMN,
    SENTIMENT_COLUMN,
    SENTIMENT_LABELS,
    TASK_FILES,
    DataFormatError,
    MalformedRowsWarning,
    ParaphraseExample,
    SentimentExample,
    Sonnet,
    default_paths,
    read_paraphrase,
    read_predictions,
    read_sentiment,
    read_sonnets,
    write_paraphrase,
    write_predictions,
    write_sentiment,
    write_sonnets,
)

__all__ = [
    "PARAPHRASE_COLUMN", "SENTIMENT_COLUMN", "SENTIMENT_LABELS", "TASK_FILES", "DataFormatError",
    "MalformedRowsWarning", "ParaphraseExample", "SentimentExample", "Sonnet", "atomic_save", "atomic_write",
    "default_paths", "read_paraphrase", "read_predictions", "read_sentiment", "read_sonnets", "write_paraphrase",
    "write_predictions", "write_sentiment", "write_sonnets",
]
