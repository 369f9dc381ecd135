"""SFT step time under glibc's malloc against tcmalloc, the allocator bench/learning.py preloads.

Runs the learning recipe's SFT job (`jobs/sft.py +experiment=learning_sft`) for a few steps under
each allocator in turn (glibc, tcmalloc, glibc, tcmalloc, ...), so that load from other processes
hits both alike, and compares the median `timing/step_s` of their metrics.jsonl, warm-up steps
left out. Needs Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it).

    python bench/cpu_allocator.py [--steps 12] [--repeats 2]
    python bench/cpu_allocator.py --smoke     # a tiny shape: checks the script runs

Last line: `RESULT {json}`; `tcmalloc_over_glibc` below 1 is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from learning import REPO, allocator_env

WARMUP_STEPS = 2


def step_times(run_dir: Path, steps: int, env: dict[str, str]) -> list[float]:
    """`timing/step_s` of each SFT step after the warm-up, in a fresh job process."""
    command = [sys.executable, str(REPO / "jobs" / "sft.py"), "+experiment=learning_sft", f"sft.max_steps={steps}",
               "logger.mode=disabled", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["timing/step_s"] for row in rows if "timing/step_s" in row][WARMUP_STEPS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few steps, one run each: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats = WARMUP_STEPS + 2, 1
    tcmalloc = allocator_env()
    if "tcmalloc" not in tcmalloc.get("LD_PRELOAD", ""):
        sys.exit("tcmalloc not found: install Debian's libtcmalloc-minimal4 (scripts/setup.sh)")
    glibc = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    times = {"glibc": [], "tcmalloc": []}
    with tempfile.TemporaryDirectory(prefix="deepeyes-allocator-") as scratch:
        for repeat in range(args.repeats):
            for name, env in (("glibc", glibc), ("tcmalloc", tcmalloc)):
                times[name] += step_times(Path(scratch) / f"{name}-{repeat}", args.steps, env)
                print(f"{name} run {repeat}: median step {statistics.median(times[name]):.3f} s", flush=True)
    glibc_s, tcmalloc_s = statistics.median(times["glibc"]), statistics.median(times["tcmalloc"])
    print("RESULT " + json.dumps({
        "glibc_step_s": round(glibc_s, 3), "tcmalloc_step_s": round(tcmalloc_s, 3),
        "tcmalloc_over_glibc": round(tcmalloc_s / glibc_s, 3), "steps_per_run": args.steps - WARMUP_STEPS,
        "runs_per_allocator": args.repeats, "load_avg_1m": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
