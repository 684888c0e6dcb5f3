"""`qkd-deploy sensitivity RUN_DIR`: the per-layer sensitivity of a run's float student at one of
its bit-widths, written as ``sensitivity.json`` and ``sensitivity.md`` into the run directory
(and ``sensitivity.png`` with ``--plot``)."""

from __future__ import annotations

import argparse
import functools
import io
import time
from pathlib import Path

import torch
from torch import nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.config import Config
from qkd_deploy.data import DatasetSplits, Preprocess
from qkd_deploy.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from qkd_deploy.pipeline.finished import FinishedRun
from qkd_deploy.pipeline.models import quantize_options
from qkd_deploy.quant.sensitivity import (
    COLUMNS,
    Evaluator,
    MixedPrecisionModel,
    Sensitivity,
    markdown,
    sensitivity_of,
)

HELD_OUT_IMAGES = 1000


def measure_for_run(
    config: Config,
    data: DatasetSplits,
    preprocess: Preprocess,
    float_model: nn.Module,
    bits: BitWidths,
    images: int = HELD_OUT_IMAGES,
    columns: frozenset[str] = COLUMNS,
    raise_to: list[str] | None = None,
    trained: tuple[nn.Module, int] | None = None,
) -> tuple[Sensitivity, MixedPrecisionModel, Evaluator]:
    """The sensitivity of ``float_model`` quantized as the run quantizes its ``bits`` student (or
    of ``trained``, that student and its QAT epochs), calibrated on ``data.calibration_size``
    training images and scored on ``images`` others (``columns``, ``raise_to``: see
    ``quant.sensitivity.sensitivity_of``)."""
    qcfg = config.quant
    calibrate_on = functools.partial(
        calibrate,
        weight_method=qcfg.weight_calibrator,
        activation_method=qcfg.activation_calibrator,
        percentile=qcfg.percentile,
    )
    size = config.data.calibration_size
    generator = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(len(data.train), generator=generator)[: size + images]
    pixels = preprocess.apply(data.train.read(pick.tolist()))  # decodes a folder's
    with torch.random.fork_rng():  # calibration samples at random: the run's numbers stay
        torch.manual_seed(config.seed)
        return sensitivity_of(
            float_model,
            quantize_options(qcfg, bits),
            pixels,
            data.train.labels[pick],
            calibrate_on,
            size,
            images,
            config.seed,
            columns,
            raise_to,
            trained,
        )


def write_tables(root: Path, table: Sensitivity, seconds: float) -> None:
    atomic_write_json(root / "sensitivity.json", {**table.to_dict(), "seconds": round(seconds, 2)})
    atomic_write_text(root / "sensitivity.md", markdown(table))


def plot(table: Sensitivity, path: Path) -> Path:
    """Accuracy per layer in each measured column (alone, left float, raised), most damaging
    first."""
    from qkd_deploy.bench.plots import _pyplot

    plt = _pyplot()
    names = [row.layer for row in table.layers]
    fig, axis = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4.2), layout="constrained")
    x = range(len(names))
    lines = [(lambda r: r.alone, "o-", "only this layer"), (lambda r: r.float, "s-", "all but it")]
    twins = sorted({p for r in table.layers for p in r.raised})
    lines += [(lambda r, p=p: r.raised.get(p), "^-", f"all, it at {p}") for p in twins]
    for column, style, label in lines:
        scores = [column(r) for r in table.layers]
        if all(scores):  # a column the table measured
            axis.plot(x, [100 * s.accuracy for s in scores], style, label=label)
    axis.axhline(100 * table.float_model.accuracy, color="gray", ls="--", label="float")
    axis.axhline(100 * table.quantized.accuracy, color="tab:red", ls=":", label=table.bits)
    axis.set_xticks(list(x), names, rotation=90, fontsize=7)
    axis.set_ylabel("held-out accuracy %")
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy sensitivity",
        description="Per-layer quantization sensitivity of a run's float student, no training: "
        "each layer quantized alone, left in float, and raised to higher bits.",
    )
    p.add_argument("run_dir")
    p.add_argument("--student", help="the student whose bit-width to measure (default: lowest)")
    p.add_argument("--images", type=int, default=HELD_OUT_IMAGES, help="held-out images")
    p.add_argument("--plot", action="store_true", help="also draw sensitivity.png (matplotlib)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    run = FinishedRun.open(args.run_dir)
    bits = run.student_bits(args.student)
    table, _, _ = measure_for_run(
        run.config, run.data, run.preprocess, run.float_student(), bits, args.images
    )
    write_tables(run.root, table, time.perf_counter() - start)
    if args.plot:
        print(f"wrote {plot(table, run.root / 'sensitivity.png')}")
    print(markdown(table))
    print(f"wrote {run.root / 'sensitivity.json'} ({time.perf_counter() - start:.1f} s)")
    return 0
