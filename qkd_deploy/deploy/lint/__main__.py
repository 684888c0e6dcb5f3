"""`python -m qkd_deploy.deploy.lint MODEL.onnx`: the same as `qkd-deploy lint MODEL.onnx`."""

import sys

from qkd_deploy.deploy.lint.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
