"""The main command on a quiet machine and beside another CPU-bound PyTorch job.

Target: beside a PyTorch process that keeps every core busy at torch's default thread count (a
loop of 256x256 matrix products), the main command takes at most 2.5x its quiet time. The
threading policy (``qkd_deploy.train.threads``: ``OMP_WAIT_POLICY=PASSIVE``, torch threads chosen
per run) is compared with what the pipeline did before it (torch's default threads, spinning
OpenMP waits: ``--legacy``).

    python benchmarks/busy_machine.py --epochs 2            # quiet, then busy
    python benchmarks/busy_machine.py --epochs 2 --legacy   # the same with the old policy

Writes ``benchmarks/results/busy_machine[-legacy].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import machine_line, targets_table, write_results

HOG = """
import time, torch
a = torch.randn(256, 256)
print("busy", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


def main_command(out: Path, epochs: int, legacy: bool) -> tuple[float, int]:
    """Seconds the main command takes, end to end, in a fresh process, and how many training
    stages it ran side by side at most (``environment.stage_processes``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    command = [sys.executable, "-m", "qkd_deploy.train_and_export", "--out", str(out)]
    command += ["--epochs", str(epochs), "--no-progress", "--allow-low-accuracy"]
    if legacy:  # the pipeline before the threading policy: torch's defaults, spinning waits
        env["OMP_WAIT_POLICY"] = "ACTIVE"
        command += ["--set", f"threads={os.cpu_count()}"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    environment = json.loads((out / "report.json").read_text())["environment"]
    return seconds, environment.get("stage_processes", 1)


def beside_a_busy_job(run):
    """``run()`` while another PyTorch process keeps the cores busy at its default threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    hog = subprocess.Popen([sys.executable, "-c", HOG], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "busy"
        time.sleep(2)  # its threads are spinning
        return run()
    finally:
        hog.kill()
        hog.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--legacy", action="store_true", help="the pre-policy threading")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        quiet, quiet_jobs = main_command(Path(tmp) / "quiet", args.epochs, args.legacy)
        busy, busy_jobs = beside_a_busy_job(
            lambda: main_command(Path(tmp) / "busy", args.epochs, args.legacy)
        )
    policy = (
        "before the policy: torch's default threads, OMP_WAIT_POLICY=ACTIVE"
        if args.legacy
        else "qkd_deploy.train.threads: PASSIVE waits, threads chosen per run"
    )
    slowdown = busy / quiet
    checks = [("beside a busy job <= 2.5x quiet", slowdown <= 2.5, f"{slowdown:.2f}x")]
    lines = [
        f"# The main command beside a busy PyTorch job ({policy})",
        "",
        machine_line(),
        "",
        f"`python -m qkd_deploy.train_and_export --epochs {args.epochs}` (digits, seed 0); the "
        "busy job: another PyTorch process at its default threads multiplying 256x256 matrices.",
        "",
        "| quiet s | beside the busy job s | slowdown | stages side by side, quiet / busy |",
        "| --- | --- | --- | --- |",
        f"| {quiet:.1f} | {busy:.1f} | {slowdown:.2f}x | {quiet_jobs} / {busy_jobs} |",
        "",
        *targets_table(checks),
    ]
    payload = {
        "policy": policy,
        "epochs": args.epochs,
        "quiet_s": round(quiet, 1),
        "busy_s": round(busy, 1),
        "slowdown": round(slowdown, 2),
        "stage_processes": {"quiet": quiet_jobs, "busy": busy_jobs},
    }
    name = "busy_machine-legacy" if args.legacy else "busy_machine"
    write_results(args.out, name, payload, checks, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
