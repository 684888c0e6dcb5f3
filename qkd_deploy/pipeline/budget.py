"""The pipeline's step before QAT under ``quant.budget``: train the uniform student briefly (the
probe), measure its per-layer sensitivity, choose the layers to keep at higher precision
(``quant.budget``) and write the choice into the run's config."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING

from qkd_deploy.config import Budget, TrainConfig, save_config
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json
from qkd_deploy.pipeline.context import Context
from qkd_deploy.pipeline.finished import FinishedRun
from qkd_deploy.pipeline.sensitivity import measure_for_run, write_tables
from qkd_deploy.pipeline.stages import quantized_student_stage
from qkd_deploy.quant.budget import choose
from qkd_deploy.quant.sensitivity import raise_targets

if TYPE_CHECKING:
    from torch import nn


def choose_layer_precision(
    ctx: Context, float_student: nn.Module, teachers: list[nn.Module], progress: bool
) -> None:
    """The pipeline's step before QAT: with ``quant.budget`` set, measure the sensitivity at the
    run's lowest bit-width (after ``quant.budget_probe_epochs`` of QAT, else of the float student
    untrained), choose within the budget and put the choice in front of ``quant.layer_bits``, in
    the run's ``config.yaml`` too. ``budget.json`` records the choice: a resumed run takes it
    from there and measures nothing again."""
    config = ctx.config
    if config.quant.budget is None:
        return
    if not ctx.plan.float_reference or ctx.plan.data_free:
        raise UserError(
            "quant.budget measures the trained float student on training images: it needs "
            "student.float_reference=true and a method that sees the data"
        )
    record_path = ctx.run.root / "budget.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is None or record.get("budget") != config.quant.budget:
        record = _measure_and_choose(ctx, float_student, teachers, progress)
        atomic_write_json(record_path, record)
    chosen = record["layer_bits"]
    merged = {**chosen, **{p: v for p, v in config.quant.layer_bits.items() if p not in chosen}}
    if merged != config.quant.layer_bits:
        config.quant.layer_bits = merged
        save_config(config, ctx.run.config)


def _measure_and_choose(
    ctx: Context, float_student: nn.Module, teachers: list[nn.Module], progress: bool
) -> dict:
    config = ctx.config
    start = time.perf_counter()
    bits = FinishedRun(ctx.run.root, config, ctx.data, ctx.preprocess).student_bits(None)
    budget = Budget.parse(config.quant.budget)
    # share and drop raise a layer to the highest precision only: measure that one
    twins = raise_targets(bits) if budget.kind == "size_kb" else raise_targets(bits)[-1:]
    epochs = config.quant.budget_probe_epochs if ctx.plan.trains else 0
    if epochs:
        probe = quantized_student_stage(
            ctx,
            bits,
            float_student,
            teachers,
            progress,
            folder=ctx.run.stage(f"budget_probe_{bits.name}"),
            train=_probe_schedule(config.student.train, epochs),
        )
        columns, trained = frozenset({"raised"} if twins else {"float"}), (probe, epochs)
    else:
        columns, trained = frozenset({"alone", "alone_raised"}), None
    table, mixed, evaluator = measure_for_run(
        config,
        ctx.data,
        ctx.preprocess,
        float_student,
        bits,
        columns=columns,
        raise_to=twins,
        trained=trained,
    )
    write_tables(ctx.run.root, table, time.perf_counter() - start)
    choice = choose(budget, table, mixed, evaluator)
    if not choice.met:
        print(
            f"warning: quant.budget {config.quant.budget}: even with every candidate layer "
            "raised the measured model misses it (QAT may still recover)",
            file=sys.stderr,
        )
    return {
        "budget": config.quant.budget,
        "bits": bits.name,
        "probe_epochs": epochs,
        **choice.to_dict(),
    }


def _probe_schedule(train: TrainConfig, epochs: int) -> TrainConfig:
    """The student's schedule compressed into ``epochs``: warm-up in proportion, then decay."""
    warmup = train.warmup_epochs * min(1.0, epochs / train.epochs)
    return dataclasses.replace(train, epochs=epochs, warmup_epochs=warmup)
