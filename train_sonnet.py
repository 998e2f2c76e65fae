"""Fine-tune GPT-2 on Shakespeare's sonnets and continue held-out sonnets from their first three lines,
scored with chrF against the true sonnets when TRUE_sonnets_held_out_dev.txt is present.

    python train_sonnet.py --method lora --data-dir data --temperature 1.2 --top-p 0.9
    python train_sonnet.py --method full --epochs 10 --eval-every 5      # generate for dev every 5 epochs

Writes predictions/<method>-generated-sonnets-dev.txt and predictions/<method>-generated-sonnets.txt (the
held-out sonnets) and runs/sonnet-<method>/ (log.json, best/, last/). `--help` lists every option.
"""
import sys

from tasks.cli import main

if __name__ == "__main__":
    sys.exit(main("sonnet"))
