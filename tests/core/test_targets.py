"""The export target as a typed value that still reads and writes as its YAML spelling."""

import json

import pytest
import yaml

from qkd_deploy.config import load_config, save_config
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline.plan import Plan
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions
from qkd_deploy.targets import Target


@pytest.mark.parametrize("target", list(Target))
def test_a_target_is_its_spelling(target):
    spelling = target.value
    assert Target.parse(spelling) is target and Target.parse(target) is target
    assert target == spelling and f"{target}" == spelling and str(target) == spelling
    assert {spelling: 1}[target] == 1 and {target: 1}[spelling] == 1
    assert json.dumps(target) == json.dumps(spelling)


def test_an_unknown_target_is_one_clear_error():
    with pytest.raises(UserError, match="unknown export target 'gpu'; use one of tensorrt, onn"):
        Target.parse("gpu")
    with pytest.raises(UserError, match="unknown export target 'TensorRT'"):
        QuantizeOptions(BitWidths(8, 8), "TensorRT")


def test_the_config_keeps_the_string_and_the_run_plans_the_target(tmp_path):
    config = load_config(overrides=["quant.target=onnxruntime"])
    assert Plan.of(config).target is Target.ONNXRUNTIME
    assert QuantizeOptions(BitWidths(4, 8), config.quant.target).target is Target.ONNXRUNTIME
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["quant"]["target"] == (
        "onnxruntime"
    )
