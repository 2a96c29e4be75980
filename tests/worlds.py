"""`make test-worlds`: the tests marked `world_draw` on the draws of the embedded world other machines build.

    python tests/worlds.py [--kernels default,avx2] [--threads 1,2] [pytest arguments ...]

torch picks its CPU kernels by the processor, and the world build's floating-point sums depend on
them and on its thread count, so another machine builds another draw of the same seed
(pipelines/world.py). `ATEN_CPU_CAPABILITY` and the build's `--threads` let one machine build those
draws: each is built once (cached under artifacts/draws/<kernel>-t<threads>), then the marked tests
run on it (PEAR_WORLD_DIR) under the same kernel path, as that machine would run them. One line per
draw at the end: its corpus, the behavior's accuracy, and the tests' result. Exit 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernels_of_this_cpu() -> list[str]:
    """default and avx2 on any x86-64 CPU that has AVX2, avx512 too where the CPU has AVX-512."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ["default"] + [k for k, flag in (("avx2", " avx2"), ("avx512", " avx512f")) if flag in flags]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(kernels_of_this_cpu()), help="ATEN_CPU_CAPABILITY values")
    parser.add_argument("--threads", default="1,2", help="the world build's torch thread counts")
    args, pytest_args = parser.parse_known_args(argv)
    lines, failed = [], False
    for kernel in args.kernels.split(","):
        for threads in args.threads.split(","):
            folder = ROOT / "artifacts" / "draws" / f"{kernel}-t{threads}"
            env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel}
            t0 = time.time()
            built = subprocess.run([sys.executable, "-m", "pipelines.world", "--out", str(folder),
                                    "--threads", threads], cwd=ROOT, env=env)
            if built.returncode != 0:
                lines.append(f"{kernel:8s} {threads} threads: the build failed ({built.returncode})")
                failed = True
                continue
            world = json.loads((folder / "world.json").read_text())
            build_s = time.time() - t0
            t0 = time.time()
            tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "world_draw", "-p", "no:cacheprovider",
                                    *pytest_args], cwd=ROOT, env={**env, "PEAR_WORLD_DIR": str(folder)},
                                   capture_output=True, text=True)
            print(tests.stdout[-4000:], tests.stderr[-2000:], sep="\n", flush=True)
            result = (tests.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
            failed |= tests.returncode != 0
            lines.append(f"{world['built_with']['kernel']:8s} {threads} threads: {world['corpus_rows']} of "
                         f"{world['corpus_rows_generated']} rows kept, behavior accuracy "
                         f"{world['behavior_accuracy']:.2f}; {result} (build {build_s:.0f} s, tests "
                         f"{time.time() - t0:.0f} s)")
    print("\n".join(["draws of the embedded world (seed 0) and the world_draw tests on each:", *lines]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
