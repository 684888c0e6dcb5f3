"""A run directory read back for analysis: its config, its data as the run saw it, and its
trained float and fake-quant students (the commands that inspect a run without training it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.config import Config, load_config
from qkd_deploy.data import DatasetSplits, Preprocess
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline.context import load_data
from qkd_deploy.pipeline.models import load_state, mark_calibrated, quantize_options, student_model
from qkd_deploy.quant.precision import quantize


@dataclass
class FinishedRun:
    root: Path
    config: Config
    data: DatasetSplits
    preprocess: Preprocess

    @classmethod
    def open(cls, root: str | Path) -> FinishedRun:
        """The run in ``root`` with its data loaded and normalised as the run did it."""
        root = Path(root)
        if not (root / "config.yaml").is_file():
            raise UserError(f"{root}: no config.yaml there; give the directory of a run")
        config = load_config(str(root / "config.yaml"))
        return cls(root, config, *load_data(config))

    def float_student(self) -> nn.Module:
        """The trained float student (the model QAT starts from), in eval mode."""
        weights = self.root / "student_float" / "model.pt"
        if not weights.is_file():
            raise UserError(
                f"{self.root} has no trained float student ({weights} is missing): finish the "
                f"run (python -m qkd_deploy.train_and_export --resume {self.root}); a run with "
                "student.float_reference=false has none"
            )
        return load_state(student_model(self.config, self.data), weights).eval()

    def student_bits(self, name: str | None) -> BitWidths:
        """The bit-width of the student called ``name`` (``w4a4`` or ``resnet8_w4a4``), or the
        run's lowest when None."""
        run_bits = [BitWidths.parse(b) for b in self.config.student.bits]
        if name is None:
            return min(run_bits, key=lambda b: (b.w + b.a, b.w))
        wanted = name.rpartition("_")[2] if "_" in name else name
        for bits in run_bits:
            if bits.name == wanted.lower():
                return bits
        raise UserError(
            f"--student {name!r}: the run has students {[b.name for b in run_bits]}; name one"
        )

    def quantized_student(self, bits: BitWidths) -> nn.Module:
        """The trained fake-quant student at ``bits``, as the pipeline saved it (eval mode)."""
        weights = self.root / bits.name / "model.pt"
        if not weights.is_file():
            raise UserError(f"{self.root} has no trained {bits.name} student ({weights})")
        student = quantize(self.float_student(), quantize_options(self.config.quant, bits))
        return load_state(mark_calibrated(student), weights).eval()
