"""The pipeline's step before QAT under ``quant.budget``: measure the float student's per-layer
sensitivity, choose the layers to keep at higher precision (``quant.budget``) and write the
choice into the run's config."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

from qkd_deploy.config import Budget, save_config
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json
from qkd_deploy.pipeline.context import Context
from qkd_deploy.pipeline.finished import FinishedRun
from qkd_deploy.pipeline.sensitivity import measure_for_run, write_tables
from qkd_deploy.quant.budget import choose

if TYPE_CHECKING:
    from torch import nn


def choose_layer_precision(ctx: Context, float_student: nn.Module) -> None:
    """The pipeline's step before QAT: with ``quant.budget`` set, measure the float student's
    sensitivity at the run's lowest bit-width, choose within the budget and put the choice in
    front of ``quant.layer_bits``, in the run's ``config.yaml`` too. ``budget.json`` records the
    choice: a resumed run takes it from there and measures nothing again."""
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
        start = time.perf_counter()
        run = FinishedRun(ctx.run.root, config, ctx.data, ctx.preprocess)
        bits = run.student_bits(None)
        table, mixed, evaluator = measure_for_run(  # the chooser reads the alone columns
            config, ctx.data, ctx.preprocess, float_student, bits, within_model=False
        )
        write_tables(ctx.run.root, table, time.perf_counter() - start)
        budget = Budget.parse(config.quant.budget)
        choice = choose(budget, table, mixed, evaluator)
        record = {"budget": config.quant.budget, "bits": bits.name, **choice.to_dict()}
        atomic_write_json(record_path, record)
        if not choice.met:
            print(
                f"warning: quant.budget {config.quant.budget}: even with every candidate layer "
                "raised the calibrated model misses it (QAT may still recover)",
                file=sys.stderr,
            )
    chosen = record["layer_bits"]
    merged = {**chosen, **{p: v for p, v in config.quant.layer_bits.items() if p not in chosen}}
    if merged != config.quant.layer_bits:
        config.quant.layer_bits = merged
        save_config(config, ctx.run.config)
