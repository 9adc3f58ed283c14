"""Speed of prepare (video -> tracked dataset) on the default video, on one CPU core.

Run ``python -m benchmarks.bench_prepare`` (``--help`` for options). Target: >= 30 frames/s.

One core: before torch, cv2 or mediapipe are imported, the process pins itself (and so every
thread it or its libraries start: MediaPipe's graph and XNNPACK threads, OpenCV, OpenMP) to a
single CPU with ``os.sched_setaffinity`` (``--cpu``, default the first CPU it may use), sets
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``TF_NUM_INTRAOP_THREADS``
to 1, and calls ``cv2.setNumThreads(1)`` and ``torch.set_num_threads(1)``. Equivalent from a
shell: ``taskset -c 0 python -m benchmarks.bench_prepare``.

Two numbers, each the best of ``--repeats`` runs after imports (interpreter start and the
MediaPipe import, ~3 s once per process, are not counted):

- ``prepare``: the whole :func:`datamodules.prepare.prepare` call into a temporary folder:
  decoding, face mesh + selfie segmentation, head masks, PNG writing, poses, PCA, JSON, preview;
- ``tracking``: :class:`datamodules.tracking.FaceTracker` alone on the decoded frames.

Wall-clock frames/s is the figure to compare with the target; frames per CPU second (this
process's threads plus its ffmpeg decoder, ``os.times``) is printed too: on a machine shared with
other jobs the pinned core is time-sliced and wall time overstates the work.

A last line prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _pin_to_one_core(cpu: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0] if cpu is None else cpu
    if cpu not in allowed:
        raise SystemExit(f"error: CPU {cpu} is not available to this process (allowed: {allowed})")
    os.sched_setaffinity(0, {cpu})
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
    ):
        os.environ[var] = "1"
    os.environ.setdefault("GLOG_minloglevel", "2")
    return cpu


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children (the ffmpeg decoder)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> dict:
    """Time prepare and tracking on one core; print and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=None, help="video file (default: the carphone clip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the best is reported")
    parser.add_argument(
        "--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)"
    )
    args = parser.parse_args(argv)
    cpu = _pin_to_one_core(args.cpu)

    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from datamodules import tracking
    from datamodules.prepare import prepare
    from datamodules.video import default_video_path, read_video

    video = default_video_path() if args.video is None else args.video
    frames = read_video(video)
    tracking.landmark_sets()  # imports mediapipe

    prepare_times, prepare_cpu, track_times = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            prepare(video, os.path.join(tmp, "dataset"), progress=False)
            prepare_times.append(time.perf_counter() - start)
            prepare_cpu.append(_cpu_seconds() - cpu_start)
        with tracking.FaceTracker() as tracker:
            start = time.perf_counter()
            found = sum(tracker(f) is not None for f in frames)
            track_times.append(time.perf_counter() - start)
    n = len(frames)
    result = {
        "video": os.path.basename(str(video)),
        "frames": n,
        "faces_found": found,
        "cpu": cpu,
        "prepare_s": round(min(prepare_times), 3),
        "prepare_fps": round(n / min(prepare_times), 1),
        "prepare_cpu_s": round(min(prepare_cpu), 3),
        "prepare_fps_cpu_time": round(n / min(prepare_cpu), 1),
        "tracking_fps": round(n / min(track_times), 1),
        "target_fps": 30.0,
    }
    print(
        f"prepare {result['video']} ({n} frames, {frames.shape[2]}x{frames.shape[1]}) on CPU {cpu}: "
        f"{result['prepare_fps']} frames/s end to end ({result['prepare_s']} s), "
        f"{result['tracking_fps']} frames/s tracking alone; {result['prepare_fps_cpu_time']} frames per CPU "
        f"second (the core's time this process got: differs from wall time on a busy machine); target >= 30 frames/s: "
        f"{'met' if result['prepare_fps'] >= 30 else 'NOT met'}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
