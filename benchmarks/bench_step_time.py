"""Training step time: the distillation step against the teacher's step, on the same frames.

Run ``python -m benchmarks.bench_step_time --teacher-ckpt RUN/checkpoints/last.ckpt [--data-root data]
[--image-size 64] [--batch-size 8] [--steps 5] [--threads 2]``. Both modules take optimiser steps
on the same real batch (the prepared default video); the teacher is the checkpoint's (its grown
cloud), the student is distilled from it. Median wall-clock seconds per step (forward, backward,
optimizer) after one warm-up step, one after the other in one process. A last line prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def time_steps(module, batch, steps: int) -> float:
    optimizer = module.configure_optimizers()["optimizer"]
    module.log = module.log_dict = lambda *a, **k: None  # no trainer here
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    from datamodules.avatar import AvatarDataModule
    from lightning_modules.distill import DistillModule
    from lightning_modules.teacher import TeacherModule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-ckpt", default="runs/teacher/latest/checkpoints/last.ckpt")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not Path(args.teacher_ckpt).is_file():
        print(f"no teacher checkpoint at {args.teacher_ckpt}: run `lightning fit --config experiments/teacher.yaml` "
              "first (or pass --teacher-ckpt); nothing timed")
        return {}
    torch.set_num_threads(args.threads)
    dm = AvatarDataModule(data_root=args.data_root, image_size=args.image_size, batch_size=args.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    teacher = TeacherModule.load_from_checkpoint(args.teacher_ckpt, map_location="cpu").train()
    student = DistillModule(expression_dim=dm.expression_dim, image_size=args.image_size, teacher_ckpt=args.teacher_ckpt).train()
    t = time_steps(teacher, batch, args.steps)
    s = time_steps(student, batch, args.steps)
    result = {"num_points": teacher.teacher.num_active, "teacher_step_s": t, "distill_step_s": s, "ratio": s / t,
              "image_size": args.image_size, "batch_size": args.batch_size, "threads": args.threads}
    print(f"N = {result['num_points']}: teacher step {t:.3f} s, distillation step {s:.3f} s, ratio {s / t:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
