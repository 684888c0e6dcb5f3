"""Bad input to the main command and the CLI: one line naming the input and the fix, exit 2, no
traceback, no run directory left behind, nothing run that the input smuggled in."""

import errno
import os

import pytest

from qkd_deploy import cli
from qkd_deploy.errors import UserError, expected_failure
from qkd_deploy.train.threads import SMALL_IMAGE_PIXELS, training_threads
from qkd_deploy.train_and_export import accuracy_failures, main


def refused(capsys, argv, *phrases):
    """``main(argv)`` exits 2 with one error line containing every phrase, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "argv, phrases",
    [
        (["--bits", ","], ["--bits ','", "names no bit-width"]),
        (["--bits", "8,w8a8"], ["['w8a8'] more than once"]),
        (["--set", "seed=["], ["override 'seed=['", "not valid YAML"]),
        (["--set", "data.calibration_size=0"], ["data.calibration_size must be >= 1"]),
        (["--set", "export.opset=5"], ["export.opset 5", "17 (TensorRT 8.6)"]),
        (["--set", "export.min_agreement=1.5"], ["min_agreement is a fraction"]),
        (["--set", "student.min_accuracy=-1"], ["min_accuracy is a fraction"]),
        (["--set", "threads=-2"], ["threads must be >= 0"]),
        (["--set", "jobs=2", "--set", "threads=2"], ["set threads=1, or jobs=1"]),
    ],
)
def test_a_bad_setting_fails_before_the_run_directory_is_made(tmp_path, capsys, argv, phrases):
    out = tmp_path / "run"
    refused(capsys, [*argv, "--out", str(out)], *phrases)
    assert not out.exists()


def test_a_yaml_tag_in_an_override_is_refused_and_never_runs(tmp_path, capsys):
    planted = tmp_path / "planted"
    payload = f'seed=!!python/object/apply:os.system ["touch {planted}"]'
    refused(capsys, ["--set", payload, "--out", str(tmp_path / "run")], "not valid YAML")
    assert not planted.exists()


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("data: {spec: 'folder:/données'}\n".encode("latin-1"))
    refused(capsys, ["--config", str(config)], str(config), "not UTF-8")


def test_out_naming_a_file_or_a_path_through_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    refused(capsys, ["--out", str(a_file)], "is a file")
    refused(capsys, ["--out", str(a_file / "run")], str(a_file), "give a folder's path")
    assert a_file.read_text() == "mine"


def test_os_failures_are_explained_with_the_path_and_the_fix():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/w4a4/checkpoint.pt")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run")
    assert "runs/x/w4a4/checkpoint.pt" in expected_failure(full)
    assert "--resume" in expected_failure(full)
    assert "choose a writable --out" in expected_failure(read_only)
    assert expected_failure(UserError("as written")) == "as written"
    # a bug is not an expected failure: it keeps its traceback
    assert expected_failure(KeyError("files")) is None
    assert expected_failure(OSError(errno.EIO, "I/O error")) is None


def test_every_cli_command_turns_an_expected_failure_into_one_line(tmp_path, capsys):
    """``qkd-deploy lint`` on a path through a file: the OSError becomes one line, exit 2."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code = cli.main(["lint", str(a_file / "model.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("qkd-deploy lint: error: ") and len(err.strip().splitlines()) == 1


def test_the_commands_let_waiting_threads_sleep_unless_the_user_chose(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["methods"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cli.main(["methods"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_training_threads_are_chosen_on_purpose():
    assert training_threads(3, SMALL_IMAGE_PIXELS) == 3  # asked for
    assert training_threads(0, 8 * 8) == 1  # small images: one thread
    cores = len(os.sched_getaffinity(0))
    assert 1 <= training_threads(0, 224 * 224) <= cores
    assert training_threads(0, 224 * 224, processes=cores) == 1  # torchrun: a share each


def report_with(accuracies: dict[str, float], num_classes: int = 10) -> dict:
    models = [{"name": name, "accuracy_onnx": acc} for name, acc in accuracies.items()]
    return {"num_classes": num_classes, "float_references": models[:1], "students": models[1:]}


def test_a_student_near_chance_fails_the_run_unless_allowed():
    report = report_with({"student_float": 0.97, "w8a8": 0.96, "w4a4": 0.10})
    (failure,) = accuracy_failures(report, None)
    assert failure.startswith("w4a4 ends at 10.00 %") and "15.00 % floor" in failure
    assert accuracy_failures(report, 0.0) == []
    assert len(accuracy_failures(report, 0.965)) == 2  # a settable floor
    assert accuracy_failures(report_with({"f": 0.56, "s": 0.56}, num_classes=2), None) == []


def test_a_full_disk_as_the_run_starts_leaves_no_directory(tmp_path, monkeypatch, capsys):
    import qkd_deploy.pipeline.runner as entry

    def disk_full(config, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(entry, "save_config", disk_full)
    out = tmp_path / "run"
    refused(capsys, ["--out", str(out)], "No space left on device", str(out / "config.yaml"))
    assert not out.exists()
