"""A run directory written by the release before the pipeline became a package (commit bbf961c)
resumes with this code, and its ``report.json`` keeps its schema.

``data/release_run`` is that release's run of a tiny config (one resnet8 teacher, one epoch per
stage, a W4A4 student, 64 calibration images, digits) with every stage after the teacher
deleted: what is left is its ``config.yaml``, the trained teacher with its recorded accuracy,
and the ``report.json`` the finished run wrote, to compare the new report with.
"""

import json
import shutil
from pathlib import Path

import pytest

from qkd_deploy.fileio import sha256_file
from qkd_deploy.pipeline.report import Report
from qkd_deploy.train_and_export import main

RELEASE_RUN = Path(__file__).parent / "data" / "release_run"
TEST_IMAGES = 360  # digits' test split


def key_paths(value, path: str = "") -> list[str]:
    """Every dict key in ``value`` as a path, in order; list items share ``[]``."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [f"{path}.{k}", *key_paths(v, f"{path}.{k}")]]
    if isinstance(value, list):
        return list(dict.fromkeys(p for item in value for p in key_paths(item, f"{path}[]")))
    return []


def test_the_typed_report_reads_and_writes_the_release_report_unchanged():
    written = json.loads((RELEASE_RUN / "report.json").read_text())
    again = Report.from_json(written).to_json()
    assert json.dumps(again) == json.dumps(written)  # the same keys and values, in order


def test_resume_finishes_a_run_directory_of_the_release(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RELEASE_RUN, run)
    old = json.loads((run / "report.json").read_text())
    recorded = json.loads((run / "teacher" / "accuracy.json").read_text())["result"]["accuracy"]
    teacher = sha256_file(run / "teacher" / "model.pt")
    (run / "report.json").unlink()

    assert main(["--resume", str(run)]) == 0

    assert sha256_file(run / "teacher" / "model.pt") == teacher  # read back, not trained again
    new = json.loads((run / "report.json").read_text())
    assert json.dumps(Report.from_json(new).to_json()) == json.dumps(new)
    # the same weights on the same images; another CPU may round one near tie the other way
    assert new["teacher"]["accuracy"] == pytest.approx(recorded, abs=1.5 / TEST_IMAGES)
    environment = ("machine", "threads", "onnxruntime_threads", "training_device")
    assert set(environment) <= set(new["environment"])
    del old["environment"], new["environment"]  # its library versions depend on the machine
    kept = set(key_paths(old))  # every key is still there, in its place; keys may be added
    assert [p for p in key_paths(new) if p in kept] == key_paths(old)
    assert [s["name"] for s in new["students"]] == ["resnet8_w4a4"]
    assert new["students"][0]["onnx_agreement"] >= 0.99
    for stage in ("student_float", "w4a4"):
        assert (run / stage / "model.onnx").is_file()
    assert (run / "manifest.json").is_file()
