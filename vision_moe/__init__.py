"""vision-moe: multi-task vision Mixture-of-Experts models on timm, from training to the edge."""

from ._factory import create_model, list_models
from .models import MoEVisionTransformer

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "MoEVisionTransformer", "__version__"]
