"""Signed bundles (``bundle --sign-key`` / ``verify --sign-key``) of a real tiny run: a signed
bundle authenticates with its key, says it was not authenticated without one, and fails with
another key, without a signature, or after an edit whose hashes were written again."""

import json
import shutil
import tarfile

import numpy as np
import pytest

from qkd_deploy.cli import main
from qkd_deploy.deploy.bundle import (
    CONTENTS,
    MANIFEST,
    SIGNATURE,
    make_bundle,
    read_sign_key,
    verify_bundle,
)
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "bundle.key"
    path.write_bytes(bytes(range(32)))
    return path


@pytest.fixture(scope="module")
def signed(run_dir, key_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "bundle"
    return make_bundle(run_dir, out, sign_key=read_sign_key(key_file))


@pytest.fixture(scope="module")
def unsigned(run_dir, tmp_path_factory):
    return make_bundle(run_dir, tmp_path_factory.mktemp("unsigned") / "bundle")


@pytest.fixture
def signed_copy(signed, tmp_path):
    return shutil.copytree(signed.directory, tmp_path / "bundle")


def _checks(result):
    return {check["name"]: (check["passed"], check["detail"]) for check in result["checks"]}


def _rewrite_hash(folder, name):
    """What an editor without the key can do: make the manifest match the edited file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {
        "sha256": sha256_file(folder / name),
        "bytes": (folder / name).stat().st_size,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_a_signed_bundle_holds_the_hmac_of_its_manifest(signed, key_file):
    import hashlib
    import hmac

    folder = signed.directory
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CONTENTS, MANIFEST, SIGNATURE])
    signature = json.loads((folder / SIGNATURE).read_text())
    manifest = (folder / MANIFEST).read_bytes()
    mac = hmac.new(key_file.read_bytes(), manifest, hashlib.sha256).hexdigest()
    assert signature["algorithm"] == "HMAC-SHA256" and signature["hmac"] == mac
    assert key_file.read_bytes().hex() not in (folder / SIGNATURE).read_text()
    with tarfile.open(signed.archive) as tar:
        assert f"{folder.name}/{SIGNATURE}" in tar.getnames()
    text = (folder / "BUILD.md").read_text()
    assert "This bundle is signed" in text and "qkd-deploy verify . --sign-key KEY" in text
    assert "Trust a bundle (or a run directory) from elsewhere as you would trust code" in text


def test_an_unsigned_bundle_says_so_in_build_md(unsigned):
    text = (unsigned.directory / "BUILD.md").read_text()
    assert "This bundle is not signed" in text and "--sign-key" in text
    assert "as you would trust code" in text


def test_the_key_authenticates_the_folder_and_the_archive(signed, key_file, capsys):
    for bundle in (signed.directory, signed.archive):
        assert main(["verify", str(bundle), "--sign-key", str(key_file)]) == 0
        out = capsys.readouterr().out
        assert "ok    signature  HMAC-SHA256 of manifest.json: authenticated" in out
        assert out.rstrip().endswith("PASS")


def test_without_the_key_a_signed_bundle_is_checked_but_not_authenticated(signed, capsys):
    assert main(["verify", str(signed.directory)]) == 0
    out = capsys.readouterr().out
    assert "signed, but not authenticated: give --sign-key KEY" in out
    result = verify_bundle(signed.archive)
    assert result["passed"]
    assert _checks(result)["signature"][1].startswith("signed, but not authenticated")


def test_a_key_and_an_unsigned_bundle_fail(unsigned, key_file, capsys):
    assert main(["verify", str(unsigned.directory), "--sign-key", str(key_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  signature  not signed (no signature.json): not authenticated" in out
    assert "model not run" in out


def test_another_key_fails_and_names_both_key_ids(signed, tmp_path):
    other = tmp_path / "other.key"
    other.write_bytes(b"another secret of 32 bytes......")
    result = verify_bundle(signed.directory, sign_key=read_sign_key(other))
    passed, detail = _checks(result)["signature"]
    assert not passed and not result["passed"]
    assert "does not match (signed with key id" in detail and "do not deploy it" in detail


def _loosen_tolerances(folder):
    expected = json.loads((folder / "expected.json").read_text())
    expected["tolerances"]["onnxruntime"] = {"max_abs_error": 1e9, "min_agreement": 0.0}
    (folder / "expected.json").write_text(json.dumps(expected))
    _rewrite_hash(folder, "expected.json")


def _shift_logits(folder):
    with np.load(folder / "sample.npz") as sample:
        arrays = dict(sample)
    arrays["logits"] = arrays["logits"] + 1
    np.savez(folder / "sample.npz", **arrays)
    _rewrite_hash(folder, "sample.npz")


@pytest.mark.parametrize("edit", [_loosen_tolerances, _shift_logits])
def test_a_consistent_edit_passes_integrity_but_fails_authentication(signed_copy, key_file, edit):
    edit(signed_copy)
    files, signature = verify_bundle(signed_copy)["checks"][:2]
    assert files["passed"] and signature["passed"]  # intact, not authenticated
    result = verify_bundle(signed_copy, sign_key=read_sign_key(key_file))
    checks = _checks(result)
    assert checks["files"][0] and not checks["signature"][0] and not result["passed"]
    assert "was changed after it was signed" in checks["signature"][1]


def test_a_damaged_signature_fails_with_the_key(signed_copy, key_file):
    key = read_sign_key(key_file)
    (signed_copy / SIGNATURE).write_text("{not json")
    passed, detail = _checks(verify_bundle(signed_copy, sign_key=key))["signature"]
    assert not passed and detail.startswith("unreadable:") and "signature.json" in detail
    forged = {"algorithm": "HMAC-SHA256", "hmac": "é" * 64}  # not hex, not even ASCII
    (signed_copy / SIGNATURE).write_text(json.dumps(forged))
    passed, detail = _checks(verify_bundle(signed_copy, sign_key=key))["signature"]
    assert not passed and "does not match" in detail


def test_key_files_are_checked(tmp_path, run_dir, capsys):
    with pytest.raises(UserError, match="no such file; make one with: head -c 32 /dev/urandom"):
        read_sign_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"secret")
    with pytest.raises(UserError, match="holds 6 bytes, fewer than 16"):
        read_sign_key(short)
    out = tmp_path / "b"
    assert main(["bundle", str(run_dir), "--out", str(out), "--sign-key", str(short)]) == 2
    assert "fewer than 16" in capsys.readouterr().err and not out.exists()
