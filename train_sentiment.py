"""Fine-tune GPT-2 to classify sentiment: SST-5 (--task sst) or CFIMDB (--task cfimdb).

    python train_sentiment.py --task sst --method lora --data-dir data
    python train_sentiment.py --task cfimdb --method loreft --rank 4 --positions f1+l1 --epochs 5
    python train_sentiment.py --task sst --model random:tiny --tokenizer ../shared/gpt2-tokenizer \\
        --data-dir ../shared/data --max-train-examples 200 --epochs 1          # a quick smoke run

Writes predictions/<method>-<task>-{dev,test}-out.csv and runs/<task>-<method>/ (log.json, best/, last/).
`--help` lists every option; the training loop itself is in tasks/trainer.py.
"""
import sys

from tasks.cli import main

if __name__ == "__main__":
    sys.exit(main("sentiment"))
