"""A tiny finished run (one W4A4 student, one epoch per stage), trained once per test session
and worker and shared by the bundle test files.

Tests make bundles of it with an explicit ``out`` in their own ``tmp_path``: only
``test_bundle.py`` makes the run's default bundle (``RUN/bundle_resnet8_w4a4``).
"""

from pathlib import Path

TINY = """
teachers: [{arch: resnet8}]
teacher_train: {epochs: 1, batch_size: 128}
student: {arch: resnet8, bits: [w4a4], float_train: {epochs: 1, batch_size: 128},
          train: {epochs: 1, batch_size: 128}}
data: {calibration_size: 64}
bench: {batch_sizes: [1], warmup: 1, iterations: 2}
progress: false
"""
STUDENT = "resnet8_w4a4"


def tiny_run(tmp_path_factory) -> Path:
    """The run directory (its config beside it as ``tiny.yaml``), trained on first use."""
    from qkd_deploy.train_and_export import main

    root = tmp_path_factory.getbasetemp() / "tiny_bundle_run"
    out = root / "run"
    if not (out / "manifest.json").is_file():  # written last: the run is complete
        root.mkdir(exist_ok=True)
        (root / "tiny.yaml").write_text(TINY)
        assert main(["--config", str(root / "tiny.yaml"), "--out", str(out)]) == 0
    return out
