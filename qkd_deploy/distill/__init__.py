"""Distillation methods: each a ``Distiller``, looked up by name in ``METHODS``."""

# importing a method module registers its methods
from qkd_deploy.distill import (  # noqa: F401, E402
    cdfkd,
    dafl,
    feature,
    logit,
    multi_teacher,
    online,
    speq,
)
from qkd_deploy.distill.base import METHODS, Distiller, build_distiller, register_method

__all__ = ["METHODS", "Distiller", "build_distiller", "register_method"]
