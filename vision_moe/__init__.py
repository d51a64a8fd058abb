"""vision-moe: multi-task vision Mixture-of-Experts models on timm, from training to the edge."""

from ._factory import create_model, list_models, list_pretrained
from .hub import save_pretrained
from .models import MoEVisionTransformer

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "list_pretrained", "save_pretrained", "MoEVisionTransformer", "__version__"]
