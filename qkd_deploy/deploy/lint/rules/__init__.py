"""The rules, one module per family. Importing this package registers them; the order of the
imports below is the registration order, so the order of ``RULES`` and of the findings.
"""

# isort: off
from qkd_deploy.deploy.lint.rules import model  # noqa: F401
from qkd_deploy.deploy.lint.rules import parameters  # noqa: F401
from qkd_deploy.deploy.lint.rules import granularity  # noqa: F401
from qkd_deploy.deploy.lint.rules import structure  # noqa: F401
from qkd_deploy.deploy.lint.rules import fusion  # noqa: F401
from qkd_deploy.deploy.lint.rules import shapes  # noqa: F401

# isort: on
