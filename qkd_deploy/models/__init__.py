"""The model zoo (CIFAR ResNets, MobileNetV2) and user models given as ``package.module:factory``.

Zoo models follow the conventions quantization and export rely on (see ``base.py``) and expose
``forward_features(x) -> (logits, {"stages": [...], "pooled": ...})`` and ``stage_channels``.
"""

from qkd_deploy.models.layers import Add
from qkd_deploy.models.registry import MODELS, available_models, build_model
from qkd_deploy.models.user import load_checkpoint, load_user_model

__all__ = [
    "MODELS",
    "Add",
    "available_models",
    "build_model",
    "load_checkpoint",
    "load_user_model",
]
