"""Loading the typed config: YAML files, ``key=value`` overrides, and their errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qkd_deploy.config import load_config, save_config
from qkd_deploy.errors import UserError


def test_exponent_floats_without_a_dot_load_as_floats(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string; the config must not."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "student:\n"
        "  train: {weight_decay: 1e-4, lr: 5E-2}\n"
        "  method: feed\n"
        "  method_options: {beta: 5e2}\n"
    )
    overrides = ["teacher_train.weight_decay=2.5e-1", "student.method_options.gamma=-2.5e-1"]
    config = load_config(str(path), [*overrides, "data.spec=folder:1e5"])
    assert config.student.train.weight_decay == pytest.approx(1e-4)
    assert config.student.train.lr == pytest.approx(0.05)
    assert config.student.method_options == {"beta": 500.0, "gamma": -0.25}
    assert config.teacher_train.weight_decay == pytest.approx(2.5e-1)
    assert config.data.spec == "folder:1e5"  # a string that merely contains one stays a string


def test_saved_config_reads_back_equal(tmp_path):
    config = load_config(overrides=["student.train.weight_decay=1e-7", "student.bits=[w2a2]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.train.epoch=3", r"unknown config key\(s\) \['epoch'\] in 'student.train'"),
        ("student.train.lr=fast", r"'student.train.lr' must be float, got 'fast'"),
        ("student.train.epochs=0", r"student.train.epochs must be >= 1"),
        ("student.train.optimizer=adam", r"student.train.optimizer 'adam': use 'sgd' or 'adamw'"),
        ("student.train.lr=-0.1", r"student.train.lr must be > 0"),
        ("teacher_train.momentum=1", r"teacher_train.momentum must be in \[0, 1\)"),
        ("student.float_train.batch_size=0", r"student.float_train.batch_size must be >= 1"),
        ("student.train.weight_decay=-1e-4", r"student.train.weight_decay must be >= 0"),
        ("student.train.warmup_epochs=-1", r"student.train.warmup_epochs must be >= 0"),
        ("seed", r"not key=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=[override])


def test_the_documented_config_example_loads(tmp_path):
    """The YAML example in docs/options.md is a valid config with valid method options."""
    from qkd_deploy.pipeline.checks import check_method

    options = (Path(__file__).parents[2] / "docs" / "options.md").read_text()
    (example,) = re.findall(r"```yaml\n(.*?)```", options, re.S)
    (tmp_path / "example.yaml").write_text(example)
    config = load_config(str(tmp_path / "example.yaml"))
    assert config.student.bits == ["w8a8", "w4a4", "w2a2"]
    assert check_method(config)["schedule"] == "cosine"


@pytest.mark.parametrize(
    "spec", ["folder:/data/set #2", "folder:/data/a: b", "cifar10:/data/[x]", "folder:1e5"]
)
def test_cli_string_flags_are_taken_as_written(spec):
    """``--data`` and the other string flags are not YAML: a ``#`` or ``: `` in a path stays."""
    from qkd_deploy.train_and_export import build_config, parse_args

    config = build_config(parse_args(["--data", spec, "--student-arch", "resnet8 #x"]))
    assert config.data.spec == spec
    assert config.student.arch == "resnet8 #x"


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_epochs_flag_is_checked_as_the_flag(value, capsys):
    """--epochs sets every stage: its error names the flag, not the first stage's key."""
    from qkd_deploy.train_and_export import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--epochs", value])
    assert f"argument --epochs: '{value}' is not a whole number >= 1" in capsys.readouterr().err


def test_a_config_section_that_is_not_a_mapping_is_named_as_such(tmp_path):
    """An override into it (``--epochs`` sets student.float_train.epochs) must not take the
    blame for the config file's mistake."""
    (tmp_path / "bad.yaml").write_text("student: 5\n")
    for overrides in ([], ["student.float_train.epochs=1"]):
        with pytest.raises(UserError, match="config section 'student' must be a mapping, got 5"):
            load_config(str(tmp_path / "bad.yaml"), overrides)
