#!/usr/bin/env python
"""Phase 3: real pair dataset + synthetic pair dataset -> combined pair dataset (synthetic pairs in train only).

The real pairs are kept unchanged in every split; synthetic pairs are added to the training split only, by
default chosen so that its benign:malignant ratio becomes 50/50 (as many as --max_synthetic_ratio allows).
Validation and test are checked to be exactly the real ones (ids, rows, file bytes) before anything is
committed. Prints the before/after table and records both sources (paths, dataset.json hashes, commands) in
the new dataset.json. Selection rules: data/combine.py."""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from common.cli import make_parser, parse_config, print_config, run_main

EPILOG = """examples:
  # the plan's command: balanced to 50/50, at most as many synthetic pairs as real training pairs
  python create_combined_dataset.py --real_data ./data/busi_processed --synthetic_data ./synthetic_busi \\
      --output_dir ./data/busi_combined
  # every synthetic pair, no cap, hard links instead of copies
  python create_combined_dataset.py --real_data ./data/busi_processed --synthetic_data ./synthetic_busi \\
      --output_dir ./data/busi_all --no-balance --max_synthetic_ratio inf --link
"""


def ratio(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (or inf for no cap), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, EPILOG)
    p.add_argument("--real_data", default="./data/busi_processed",
                   help="the real pair dataset (prepare_busi_dataset.py); all its pairs are kept, every split")
    p.add_argument("--synthetic_data", default="./synthetic_busi",
                   help="the synthetic pair dataset (generate_synthetic.py); training pairs only")
    p.add_argument("--output_dir", default="./data/busi_combined",
                   help="where the combined pair dataset is written (staged, renamed into place when complete; "
                        "an older pair dataset there is replaced)")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                   help="pick benign/malignant synthetic pairs so the training split becomes 50/50 (as many as the "
                        "cap allows); --no-balance adds every synthetic pair (all labels) up to the cap")
    p.add_argument("--max_synthetic_ratio", type=ratio, default=1.0,
                   help="at most this many synthetic pairs per real training pair (all labels); inf = no cap")
    p.add_argument("--link", action="store_true",
                   help="hard-link the PNGs (symlink across file systems) instead of copying them")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of synthetic pairs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(build_parser(), argv)
    if args.dry_run:
        print_config(args)
        return 0
    from data.combine import combine

    t0 = time.time()
    ds = combine(args.real_data, args.synthetic_data, args.output_dir, balance=args.balance,
                 max_synthetic_ratio=args.max_synthetic_ratio, link=args.link, seed=args.seed,
                 command=args.command)
    info = ds.info["combined"]
    print(f"wrote {len(ds)} pairs ({info['n_synthetic']} synthetic, training split only) to {ds.root} "
          f"in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
