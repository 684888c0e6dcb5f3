"""The linter on 300 seeded mutants of real exported Q/DQ models (``lint_mutants``): a report or
one UserError, never another exception or a hang, and never 0 errors for a model ONNX's checker
or ONNX Runtime rejects. ``benchmarks/lint_fuzz.py`` runs 1000 more."""

import os

import pytest

from qkd_deploy.deploy.lint import MAX_ONNX_BYTES, lint_file
from qkd_deploy.errors import UserError
from tests.support.lint_mutants import outcome, seed_models, write_mutants

MUTANTS = 300


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_models(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def outcomes(seeds, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mutants")
    return [outcome(mutant) for mutant in write_mutants(seeds, folder, MUTANTS, seed=0)]


def _listed(bad) -> str:
    return "\n".join(f"{o.mutant.path.name} {o.mutant.edits}: {o.lint} {o.detail}" for o in bad)


def test_the_seed_models_are_valid(seeds):
    """The premise: every mutant starts from a model ONNX's checker accepts."""
    for path in seeds:
        rules = {f.rule for f in lint_file(str(path)) if f.severity == "error"}
        assert not rules & {"MODEL-CHECKER", "MODEL-TENSOR-DATA", "LINT-INTERNAL"}, rules


def test_every_mutant_gets_a_report_or_one_user_error(outcomes):
    bad = [o for o in outcomes if o.lint not in ("report", "user error")]
    assert not bad, _listed(bad)


def test_no_mutant_the_checker_or_onnxruntime_rejects_passes(outcomes):
    passed = [o for o in outcomes if o.invalid_passed]
    assert not passed, _listed(passed)


def test_the_mutants_span_valid_and_invalid_models(outcomes):
    """The oracle discriminates: some mutants stay valid, most are rejected, some unreadable."""
    rejected = [o for o in outcomes if o.checker_rejects or o.onnxruntime_rejects]
    assert 0 < len(rejected) < MUTANTS
    assert any(o.lint == "user error" for o in outcomes)
    assert any(o.lint == "report" and o.errors == 0 for o in outcomes)


def test_a_file_over_the_protobuf_limit_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(MAX_ONNX_BYTES + 1)  # sparse: takes no disk space
    assert os.path.getsize(huge) > MAX_ONNX_BYTES
    with pytest.raises(UserError, match="over the 2 GiB protobuf limit"):
        lint_file(str(huge))
