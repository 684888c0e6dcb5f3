"""A run from start to end: the run directory held, every check before training, the stages in
order, and the report, the manifest and the sample batch written."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qkd_deploy.bench.report import write_report
from qkd_deploy.bits import BitWidths
from qkd_deploy.config import Config, load_config, save_config, to_dict
from qkd_deploy.data.folder import FolderSplit
from qkd_deploy.data.loader import default_workers
from qkd_deploy.deploy.bundle import remove_stale_bundles
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file
from qkd_deploy.pipeline.budget import choose_layer_precision
from qkd_deploy.pipeline.checks import check_before_training
from qkd_deploy.pipeline.context import Context, load_data
from qkd_deploy.pipeline.plan import FloatStudent, teacher_stage
from qkd_deploy.pipeline.report import Environment, FloatReference, Report, StudentResult
from qkd_deploy.pipeline.side_by_side import Stage, stage_processes, train_side_by_side
from qkd_deploy.pipeline.stages import (
    check_data_unchanged,
    collapse_warning,
    export_stage,
    float_student_stage,
    onnx_stage,
    quantized_student_stage,
    save_sample_batch,
    teachers_stage,
)
from qkd_deploy.rundir import RunDir, library_versions, machine_description, write_manifest
from qkd_deploy.train import distributed
from qkd_deploy.train.device import describe
from qkd_deploy.train.threads import set_training_threads


def run(config: Config, root: Path, new: bool = False) -> dict:
    """Every stage, with the run directory held against other runs; returns the report as
    ``report.json`` holds it.

    The lock is taken before anything is checked or written, so a second run never touches a
    directory it does not hold. A new run that stops, for any reason, before a stage wrote a
    file leaves no run directory behind: the same command runs again once the input is fixed."""
    run_dir = RunDir(root)
    with run_dir.exclusive():
        if new:
            claim(root, config)  # refuses a directory holding anything: nothing to undo then
        else:  # a resume with --set export.*/bench.* changed the config: the record follows
            stored = root / "config.yaml"
            if stored.is_file() and to_dict(load_config(str(stored))) != to_dict(config):
                save_config(config, stored)
        try:
            return run_stages(config, root)
        except BaseException:
            if new:
                run_dir.remove_if_unstarted()
            raise


def claim(root: Path, config: Config) -> None:
    """Make ``root`` (held, empty but for its lock) this new run's directory."""
    if any(p.name != ".lock" for p in root.iterdir()):
        raise UserError(
            f"run directory {root} is not empty; use --resume {root} to continue it "
            f"or --out to choose a new one"
        )
    try:
        save_config(config, root / "config.yaml")
    except BaseException:  # e.g. a full disk: the directory stays as empty as it was
        RunDir(root).remove_if_unstarted()
        raise


def run_stages(config: Config, root: Path) -> dict:
    """The checks, then every stage in order (each skipped when its files exist); writes the
    report, the manifest and the sample batch, and returns the report as written."""
    timings: dict[str, float] = {}
    progress = config.progress
    with timed(timings, "data"):
        data, preprocess = load_data(config)
    threads = set_training_threads(
        config.threads, int(np.prod(data.image_size)), distributed.world_size()
    )
    ctx = Context(config, data, preprocess, RunDir(root))
    check_data_unchanged(ctx)
    plan = ctx.plan
    check_before_training(ctx)
    save_sample_batch(ctx)
    side = SideBySide(ctx, threads, timings)
    trained_teachers = [teacher_stage(i) for i, t in enumerate(plan.teachers) if not t.module]
    float_trained = plan.float_student is FloatStudent.TRAINED
    if trained_teachers and float_trained and not plan.float_method_uses_teachers:
        side.train(  # the float student needs nothing from the teachers
            [
                Stage("teachers", lambda p: teachers_stage(ctx, p), tuple(trained_teachers)),
                Stage(
                    "student_float", lambda p: float_student_and_onnx(ctx, p), ("student_float",)
                ),
            ]
        )
    with timed(timings, "teachers"):
        teachers, teacher_results = teachers_stage(ctx, progress)
    with timed(timings, "student_float"):
        float_student = float_student_stage(ctx, teachers, progress)
    references = []
    if plan.float_reference:
        with timed(timings, "export_student_float"):
            measured = export_stage(ctx, float_student, "student_float", quantized=False)
        references.append(
            FloatReference("student_float", plan.student_arch, plan.float_row_method, measured)
        )
    with timed(timings, "precision_budget"):  # quant.budget: per-layer precision, before QAT
        choose_layer_precision(ctx, float_student, teachers, progress)
    if plan.trains:
        side.train(
            [
                Stage(
                    f"train_{bits.name}",
                    functools.partial(student_and_onnx, ctx, bits, float_student, teachers),
                    (bits.name,),
                )
                for bits in plan.bits
            ]
        )
    students = []
    for bits in plan.bits:
        with timed(timings, f"train_{bits.name}"):
            student = quantized_student_stage(ctx, bits, float_student, teachers, progress)
        with timed(timings, f"export_{bits.name}"):
            measured = export_stage(ctx, student, bits.name, quantized=True)
        warnings = [measured.warning] if measured.warning else []
        collapse = collapse_warning(
            bits.name, measured.accuracy_onnx, data.num_classes, plan.trains
        )
        if collapse:
            print(f"warning: {collapse}", file=sys.stderr)
            warnings.append(collapse)
        name = f"{plan.student_label}_{bits.name}"
        students.append(
            StudentResult(name, plan.student_arch, plan.method, bits, measured, tuple(warnings))
        )
    report = Report(
        dataset=data.name,
        test_samples=len(data.test),
        num_classes=data.num_classes,
        class_names=data.class_names,
        preprocess=preprocess,
        input_shape=(data.in_channels, *data.image_size),
        target=plan.target,
        teachers=tuple(teacher_results),
        data_free=plan.data_free,
        float_references=tuple(references),
        students=tuple(students),
        timings_s=timings,
        environment=Environment(
            machine=machine_description(),
            threads=torch.get_num_threads(),
            onnxruntime_threads=config.bench.threads,
            training_device=describe(ctx.device),
            training_processes=distributed.world_size(),
            stage_processes=side.most_processes,
            versions=library_versions(),
        ),
    )
    written = report.to_json()
    write_report(root, written)  # adds what it reads from the ONNX files (layer_precision)
    for stale in remove_stale_bundles(root):
        print(
            f"note: removed {stale.name} (and its .tar.gz): it held an earlier export; make it "
            f"again with qkd-deploy bundle {root}",
            file=sys.stderr,
        )
    write_manifest(root, inputs=inputs(config), config=to_dict(config))
    return written


def float_student_and_onnx(ctx: Context, progress: bool) -> None:
    """The float student trained on the labels, and its ONNX file when the run reports it."""
    model = float_student_stage(ctx, [], progress)
    if ctx.plan.float_reference:
        onnx_stage(ctx, model, "student_float", quantized=False)


def student_and_onnx(
    ctx: Context,
    bits: BitWidths,
    float_student: nn.Module,
    teachers: list[nn.Module],
    progress: bool,
) -> None:
    """One low-bit student trained, and its ONNX file."""
    student = quantized_student_stage(ctx, bits, float_student, teachers, progress)
    onnx_stage(ctx, student, bits.name, quantized=True)


class SideBySide:
    """Trains groups of independent stages side by side where cores are idle (``jobs``); the
    stages' own wall times go into the run's timings, the largest process count into its
    report."""

    def __init__(self, ctx: Context, threads: int, timings: dict[str, float]) -> None:
        self.ctx, self.threads, self.timings = ctx, threads, timings
        self.most_processes = 1
        self.noted = False

    def _note_jobs_refused(self, stages: int) -> None:
        """Say once why ``jobs=N`` trains one stage at a time: more than one torch thread (from
        ``OMP_NUM_THREADS`` or chosen for large images; ``threads`` and ``jobs`` both set are
        refused when the config loads)."""
        if self.noted or stages < 2 or self.ctx.config.jobs <= 1 or self.threads <= 1:
            return
        self.noted = True
        print(
            f"note: jobs={self.ctx.config.jobs} ignored: stages train side by side only at one "
            f"torch thread each, and this run trains at {self.threads} (a forked process at more "
            "can hang in torch's OpenMP); --set threads=1 (or OMP_NUM_THREADS=1) trains them side "
            "by side",
            file=sys.stderr,
        )

    @property
    def decoders(self) -> int:
        """The processes each stage's data loader decodes a streamed folder with."""
        if not isinstance(self.ctx.data.train, FolderSplit):
            return 0
        workers = self.ctx.config.data.workers
        return default_workers() if workers is None else workers

    def train(self, stages: list[Stage]) -> None:
        """Train the unfinished ``stages`` side by side, if more than one and cores allow."""
        stages = [stage for stage in stages if not stage.finished(self.ctx.run.root)]
        processes = stage_processes(
            self.ctx.config.jobs, self.threads, self.ctx.device, len(stages), self.decoders
        )
        if processes <= 1:  # each stage trains when the run reaches it
            self._note_jobs_refused(len(stages))
            return
        self.most_processes = max(self.most_processes, processes)
        seconds = train_side_by_side(stages, processes, self.ctx.config.progress)
        for name, spent in seconds.items():
            self.timings[name] = round(spent, 2)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time (seconds) of the ``with`` block to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)


def inputs(config: Config) -> dict:
    """The run's inputs for the manifest: the data, and the sha256 of every checkpoint given."""
    checkpoints = [t.checkpoint for t in config.teachers if t.checkpoint]
    student = config.student.checkpoint
    return {
        "data": config.data.spec,
        "teacher_checkpoints": [
            {"path": path, "sha256": sha256_file(path)}
            for path in checkpoints
            if os.path.isfile(path)
        ],
        "student_checkpoint": (
            {"path": student, "sha256": sha256_file(student)}
            if student and os.path.isfile(student)
            else None
        ),
    }
