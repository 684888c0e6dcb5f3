"""Mixed precision under a share budget on Fashion-MNIST: sensitivity-chosen layers vs the same
number of randomly chosen layers vs uniform bits.

Per (student architecture, bit-width, seed): one float student (plain, on the labels), then
three plain-QAT students (``--method none``) from it: uniform bits; ``quant.budget=share:S``
(the pipeline measures the float student's sensitivity and raises the chosen layers, on the
2/4/8 grid); and the same number of layers, drawn at random among those the budget could
raise, at W8A8 (``quant.layer_bits``). Reported: ONNX accuracy on the full test split, and the
share of the uniform student's gap to the float student that each mixed student recovers.

    python benchmarks/mixed_precision.py [--archs resnet8 mobilenetv2] [--bits w4a4 w2a2]
        [--seeds 0 1] [--train-limit 2000] [--float-epochs 10] [--epochs 3] [--share 0.1]
        [--work DIR] [--out benchmarks/results] [--name mixed_precision]

Needs Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from results_io import machine_line

from qkd_deploy.config import load_config, save_config
from qkd_deploy.models import build_model
from qkd_deploy.train_and_export import run


def _config(args, arch: str, bits: str, seed: int, out: Path, extra: list[str]):
    overrides = [
        "data.spec=fashion-mnist",
        f"data.train_limit={args.train_limit}",
        f"student.arch={arch}",
        f"student.bits=[{bits}]",
        "student.method=none",
        "teachers=[{arch: resnet8}]",  # plain QAT reads no teacher: the cheapest one, 1 epoch
        "teacher_train.epochs=1",
        f"student.float_train.epochs={args.float_epochs}",
        f"student.train.epochs={args.epochs}",
        "student.train.lr=0.05",
        f"seed={seed}",
        "progress=false",
        "bench.batch_sizes=[1]",
        "bench.iterations=2",
        "bench.warmup=1",
        f"out={out}",
        *extra,
    ]
    return load_config(overrides=overrides)


def _run(args, arch, bits, seed, name, pool: Path | None, extra: list[str]) -> dict:
    out = Path(args.work) / f"{arch}-{bits}-s{seed}" / name
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if pool is not None:
        for stage in ("teacher", "student_float"):
            shutil.copytree(pool / stage, out / stage)
    config = _config(args, arch, bits, seed, out, extra)
    save_config(config, out / "config.yaml")
    return run(config, out)


def _raisable(arch: str, record: dict) -> list[str]:
    """Layers the budget could raise: quantizable modules, without the first conv and the last
    linear (already 8 bits)."""
    from torch import nn

    from qkd_deploy.models.layers import Add

    model = build_model(arch, 1, 10)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, Add)]
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return [n for n in names if n not in (convs[:1] + linears[-1:])]


def one(args, arch: str, bits: str, seed: int) -> dict:
    start = time.perf_counter()
    uniform = _run(args, arch, bits, seed, "uniform", None, [])
    pool = Path(args.work) / f"{arch}-{bits}-s{seed}" / "uniform"
    chosen = _run(args, arch, bits, seed, "sensitivity", pool, [f"quant.budget=share:{args.share}"])
    record = json.loads((pool.parent / "sensitivity" / "budget.json").read_text())
    count = len(record["layer_bits"])
    rng = random.Random(1000 + seed)
    layers = rng.sample(_raisable(arch, record), count)
    random_bits = "{" + ", ".join(f"{name}: w8a8" for name in layers) + "}"
    randomly = _run(args, arch, bits, seed, "random", pool, [f"quant.layer_bits={random_bits}"])
    float_acc = uniform["float_references"][0]["accuracy_onnx"]
    acc = {
        name: report["students"][0]["accuracy_onnx"]
        for name, report in (("uniform", uniform), ("sensitivity", chosen), ("random", randomly))
    }
    gap = float_acc - acc["uniform"]
    return {
        "arch": arch,
        "bits": bits,
        "seed": seed,
        "float": float_acc,
        **acc,
        "raised": record["layer_bits"],
        "random_layers": layers,
        "selectable_layers": record["predicted"]["selectable_layers"],
        "recovered_sensitivity": (acc["sensitivity"] - acc["uniform"]) / gap if gap else None,
        "recovered_random": (acc["random"] - acc["uniform"]) / gap if gap else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown(rows: list[dict], args, machine: str) -> str:
    lines = [
        "# Mixed precision under a share budget (Fashion-MNIST)",
        "",
        f"{machine}. {time.strftime('%Y-%m-%d')}. Command: `python "
        f"benchmarks/mixed_precision.py --archs {' '.join(args.archs)} --bits "
        f"{' '.join(args.bits)} --seeds {' '.join(map(str, args.seeds))} --train-limit "
        f"{args.train_limit} --float-epochs {args.float_epochs} --epochs {args.epochs} "
        f"--share {args.share}`",
        "",
        "Plain QAT (`none`), ONNX accuracy % on the 10 000 test images. `recovered`: share of the "
        "uniform student's gap to the float student that the mixed student closes.",
        "",
        "| arch | bits | seed | float | uniform | sensitivity | random | raised | "
        "recovered (sens.) | recovered (random) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:

        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}"

        raised = ", ".join(f"{k}:{v}" for k, v in r["raised"].items())
        lines.append(
            f"| {r['arch']} | {r['bits']} | {r['seed']} | {100 * r['float']:.2f} | "
            f"{100 * r['uniform']:.2f} | {100 * r['sensitivity']:.2f} | {100 * r['random']:.2f} | "
            f"{raised} ({len(r['raised'])}/{r['selectable_layers']}) | "
            f"{pct(r['recovered_sensitivity'])} % | {pct(r['recovered_random'])} % | "
            f"{r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet8", "mobilenetv2"])
    p.add_argument("--bits", nargs="+", default=["w4a4", "w2a2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--float-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--work", default="/tmp/qkd-mixed-precision")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="mixed_precision")
    args = p.parse_args()
    rows = [
        one(args, arch, bits, seed)
        for arch in args.archs
        for bits in args.bits
        for seed in args.seeds
    ]
    out = Path(args.out)
    machine = machine_line()
    (out / f"{args.name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (out / f"{args.name}.md").write_text(markdown(rows, args, machine))
    print(markdown(rows, args, machine))


if __name__ == "__main__":
    main()
