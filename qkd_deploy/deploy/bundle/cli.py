"""The two commands: `qkd-deploy bundle RUN_DIR` and `qkd-deploy verify BUNDLE`."""

from __future__ import annotations

import argparse
import json

from qkd_deploy.deploy.bundle.make import make_bundle
from qkd_deploy.deploy.bundle.signing import MIN_KEY_BYTES, read_sign_key
from qkd_deploy.deploy.bundle.verify import RUNTIMES, format_result, verify_bundle


def main_bundle(argv: list[str]) -> int:
    """`qkd-deploy bundle RUN_DIR [--out DIR] [--student NAME] [--sign-key FILE]`."""
    parser = argparse.ArgumentParser(
        prog="qkd-deploy bundle",
        description="Pack one student of a run for the device: model, preprocessing, labels, "
        "expected outputs, build recipe and hashes (a folder and a .tar.gz of it).",
    )
    parser.add_argument("run_dir", help="a finished run directory (with report.json)")
    parser.add_argument("--out", help="bundle folder (default: RUN_DIR/bundle_<student>)")
    parser.add_argument("--student", help="student name in report.json (default: fewest bits)")
    parser.add_argument(
        "--sign-key",
        metavar="FILE",
        help="sign the bundle (HMAC-SHA256 of its manifest) with the bytes of FILE, a secret of "
        f"at least {MIN_KEY_BYTES} bytes (head -c 32 /dev/urandom > FILE); verify --sign-key "
        "FILE authenticates it",
    )
    args = parser.parse_args(argv)
    key = read_sign_key(args.sign_key) if args.sign_key else None
    bundle = make_bundle(args.run_dir, args.out, args.student, sign_key=key)
    signed = " (signed)" if key is not None else ""
    print(
        f"wrote {bundle.directory} and {bundle.archive}{signed} (student {bundle.student}); on "
        f"the device follow {bundle.directory.name}/BUILD.md, then run 'qkd-deploy verify .' there"
    )
    return 0


def main_verify(argv: list[str]) -> int:
    """`qkd-deploy verify BUNDLE`: 0 when every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="qkd-deploy verify",
        description="Check a deploy bundle on this machine: file hashes (and with --sign-key its "
        "signature), then the sample images through ONNX Runtime or a TensorRT engine against "
        "the expected logits.",
    )
    parser.add_argument("bundle", help="bundle folder or its .tar.gz")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, help="default: tensorrt with --engine, else onnxruntime"
    )
    parser.add_argument(
        "--engine",
        help="TensorRT engine built from the bundle's model.onnx by qkd-deploy build-engine "
        "(default with --runtime tensorrt: the bundle's model.<precision>.engine)",
    )
    parser.add_argument(
        "--sign-key",
        metavar="FILE",
        help="the key the bundle was signed with (bundle --sign-key): it must be signed with it",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    runtime = args.runtime or ("tensorrt" if args.engine else "onnxruntime")
    key = read_sign_key(args.sign_key) if args.sign_key else None
    result = verify_bundle(args.bundle, runtime, args.engine, sign_key=key)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0 if result["passed"] else 1
