"""One owner for a run: ``run(config, root, new=False)`` checks, trains, exports and measures,
and writes the report.

The modules, each building on the ones before it:

- ``plan``: what a run will do, read once from its config (stages, teachers, bits, flags)
- ``context``: what every stage reads (config, plan, data, run directory)
- ``models``: the run's teachers and students built, checked, saved and loaded
- ``checks``: every check before training
- ``report``: the report as typed values, written as ``report.json``
- ``stages``: teachers, float student, KD-QAT students, export and measurement
- ``finished``, ``sensitivity``, ``budget``: a finished run read back, per-layer sensitivity,
  and the precision budget that runs before QAT
- ``runner``: ``run`` itself
- ``diff_reference``, ``diff``: ``qkd-deploy diff`` and the run's torch side of it

The package itself imports nothing: the ``diff`` command runs without torch, and ``run`` loads
the pipeline the first time it is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from qkd_deploy.pipeline.runner import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
