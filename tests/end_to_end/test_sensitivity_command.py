"""`qkd-deploy sensitivity RUN_DIR` on a real finished run: the table, its JSON and its plot."""

import json
import shutil

import pytest

from qkd_deploy.cli import main
from tests.support.bundle_run import tiny_run


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory):
    """A copy of the tiny run: the command writes into the run directory."""
    copy = tmp_path_factory.mktemp("sensitivity") / "run"
    shutil.copytree(tiny_run(tmp_path_factory), copy)
    return copy


def test_sensitivity_writes_every_layer_most_damaging_first_and_a_plot(run_copy, capsys):
    assert main(["sensitivity", str(run_copy), "--images", "200", "--plot"]) == 0
    table = json.loads((run_copy / "sensitivity.json").read_text())
    assert table["bits"] == "w4a4" and table["images"] == 200
    damage = [row["alone"]["kl"] for row in table["layers"]]
    assert damage == sorted(damage, reverse=True)
    assert {"stem.0", "fc", "stages.0.0.conv1"} <= {row["layer"] for row in table["layers"]}
    assert all(row["float"] is not None and "w8a8" in row["raised"] for row in table["layers"])
    assert (run_copy / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| stages.0.0.conv1 |" in out and "sensitivity.json" in out


def test_sensitivity_of_a_student_the_run_lacks_is_one_clear_error(run_copy, capsys):
    assert main(["sensitivity", str(run_copy), "--student", "resnet8_w2a2"]) == 2
    err = capsys.readouterr().err
    assert "resnet8_w2a2" in err and "Traceback" not in err
