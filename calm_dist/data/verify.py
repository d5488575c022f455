"""Shard directories checked against their index.json: `calm-prepare-data verify DIR ...`.

    calm-prepare-data verify data/sotu            # a prepared directory (its train/ and valid/)
    calm-prepare-data verify data/sotu/train      # one shard directory

Every shard is read once: present, the size and sha256 the index lists, a readable tar with the
listed number of documents, every token id inside the vocabulary. Exit 0 when all verify, 1 with
one line per damaged shard otherwise. Training does the same checks as it goes (data.verify).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from calm_dist.data.index import INDEX_NAME, load_index
from calm_dist.data.shards import verify_shards


def shard_directories(path: Path) -> list[Path]:
    """`path` itself when it holds an index, else its sub-directories that do (train/, valid/)."""
    if (path / INDEX_NAME).is_file():
        return [path]
    found = sorted(d for d in path.iterdir() if (d / INDEX_NAME).is_file()) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: no {INDEX_NAME} there or in its sub-directories (not prepared data)")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calm-prepare-data verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="prepared or shard directories")
    args = parser.parse_args(argv)
    damaged = 0
    for given in args.dirs:
        try:
            directories = shard_directories(given)
        except FileNotFoundError as err:
            print(f"calm-prepare-data verify: error: {err}", file=sys.stderr)
            return 1
        for directory in directories:
            started = time.perf_counter()
            index = load_index(directory)
            problems = verify_shards(index)
            for problem in problems:
                print(f"DAMAGED {problem}")
            damaged += len(problems)
            state = "OK" if not problems else f"{len(problems)} damaged"
            print(f"{directory}: {len(index.shards)} shards, {index.tokens:,} tokens: {state} "
                  f"({time.perf_counter() - started:.1f} s)")
    return 1 if damaged else 0
