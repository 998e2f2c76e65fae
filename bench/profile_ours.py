"""Where our time goes: torch.profiler over one benchmark workload of bench/ours.py, ops grouped by name and
input shape, plus the share of wall time spent outside any op (Python and dispatch overhead).

    python bench/profile_ours.py forward                 # the machine's precision, 8 x 128
    python bench/profile_ours.py generate --batch 1      # 128 new tokens from 32
    python bench/profile_ours.py step --method loreft    # one training step, 8 x 64
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import ours  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["forward", "generate", "step"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the CPU has bf16 instructions, else fp32 (as --precision auto trains)")
    parser.add_argument("--batch", type=int, default=1, help="generate: batch size")
    parser.add_argument("--method", default="loreft", help="step: full, lora or loreft")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    precision = ours.best_precision() if args.precision == "auto" else args.precision

    with tempfile.TemporaryDirectory() as weights:
        ours.export_weights(weights)
        if args.workload == "forward":
            case = ours.forward_case(weights, precision)
        elif args.workload == "generate":
            case = ours.generate_case(weights, precision, args.batch)
        else:
            case = ours.train_step_case(weights, args.method, precision=precision)
    case.step()  # warm
    start = time.perf_counter()
    units = case.step()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        case.step()
    averages = prof.key_averages(group_by_input_shape=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=42,
                         max_shapes_column_width=70))
    # Time inside top-level aten ops vs wall time: the rest is Python and dispatcher overhead between them.
    in_ops = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(f"unprofiled wall time {wall:.3f} s for {units} units ({units / wall:.1f}/s); "
          f"profiled ops' self time {in_ops:.3f} s")


if __name__ == "__main__":
    main()
