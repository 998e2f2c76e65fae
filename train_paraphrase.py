"""Fine-tune GPT-2 to detect paraphrases (Quora Question Pairs) as a yes/no cloze on its next-token logits.

    python train_paraphrase.py --method lora --data-dir data
    python train_paraphrase.py --method last-linear-layer --epochs 1 --max-train-examples 2000

Writes predictions/<method>-para-{dev,test}-out.csv (test only when quora-test-student.csv is present) and
runs/quora-<method>/ (log.json, best/, last/). `--help` lists every option.
"""
import sys

from tasks.cli import main

if __name__ == "__main__":
    sys.exit(main("paraphrase"))
