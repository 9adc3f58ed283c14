"""The deployment table: what compression buys on a device.

Run from the checkout root after ``make demo``::

    python -m benchmarks.deploy [--runs runs/demo] [--teacher CKPT --student CKPT --gar CKPT]
                                [--out DIR] [--json FILE] [--image-size S] [--repeats 5] [--threads N]

Checkpoints default to ``<runs>/{teacher,distill,gar}/latest/checkpoints/best.ckpt`` (else
``last.ckpt``); the output folder to ``<runs>/deploy/``. It writes each deployable form (teacher,
teacher_table, student, student_gar) in float32 and float16 into ``<out>/<form>/``, prints the
Markdown table and, with ``--json``, writes the table as JSON. ``--threads`` sets torch's
intra-op threads for the timings (on the 2-core machine shared with a running fit, 1 thread gave
steadier figures than 2: a 32 x 32 teacher frame took 6 ms against 150 ms). What ships and what
is counted: :mod:`lightning_modules.deploy`. A missing checkpoint, or an output folder this tool did not make,
is a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lightning_modules.deploy import (
    DeployError,
    default_checkpoint,
    deployment_table,
    format_deployment_markdown,
)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        the table dict of :func:`lightning_modules.deploy.deployment_table`.

    Raises:
        SystemExit: status 2 with one line ``error: ...`` on stderr for a missing or unusable
            checkpoint, or an output folder this tool may not write.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.deploy",
        description="Bytes, one-off and per-frame cost of each deployable form of the avatar.",
    )
    parser.add_argument("--runs", default="runs/demo", help="runs root of the three stages (default runs/demo)")
    parser.add_argument("--teacher", help="teacher checkpoint (default <runs>/teacher/latest/checkpoints/best|last.ckpt)")
    parser.add_argument("--student", help="distillation checkpoint (default <runs>/distill/latest/checkpoints/...)")
    parser.add_argument("--gar", help="GAR checkpoint (default <runs>/gar/latest/checkpoints/...)")
    parser.add_argument("--out", help="output folder (default <runs>/deploy)")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    parser.add_argument("--image-size", type=int, default=None, help="S of the timed frame (default the run's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure, median reported (5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the timings (default torch's; 1 is steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    threads = torch.get_num_threads()
    try:
        teacher = args.teacher or default_checkpoint(args.runs, "teacher")
        student = args.student or default_checkpoint(args.runs, "distill")
        gar = args.gar or default_checkpoint(args.runs, "gar")
        out = args.out or Path(args.runs) / "deploy"
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        table = deployment_table(teacher, student, gar, out, image_size=args.image_size, repeats=args.repeats)
    except (DeployError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads)
    print(format_deployment_markdown(table), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
