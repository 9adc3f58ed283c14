"""`make bench`: run every benchmark in turn (speed and memory; never part of `make test`).

Usage: python -m benchmarks.run_all [name ...]   (names without the `bench_` prefix; default: all)
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def available() -> list[str]:
    """Benchmark names: the `bench_*.py` modules beside this file."""
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))


def main(names: list[str] | None = None) -> None:
    names = names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in names:
        print(f"\n=== benchmarks.bench_{name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        saved, sys.argv = sys.argv, [f"bench_{name}"]
        try:
            module.main()
        finally:
            sys.argv = saved
        print(f"=== {name}: {time.perf_counter() - start:.1f} s ===", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
