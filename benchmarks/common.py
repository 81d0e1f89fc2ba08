"""Shared by the benchmarks: argument parsing, the markdown table, the JSON record, the environment."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a shorter version (what `make bench` runs)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="scratch space (state dirs, models)")
    return p


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows` (dicts), floats with 3 significant decimals."""
    columns = list(columns or rows[0].keys())

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: Sequence[dict], args: argparse.Namespace, columns: Sequence[str] | None = None,
           **extra) -> None:
    """Print the table (and the extras) and write the JSON record if asked."""
    print(table(rows, columns))
    for key, value in extra.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": name, "environment": environment(), "rows": list(rows), **extra},
                                        indent=1, default=str) + "\n")
