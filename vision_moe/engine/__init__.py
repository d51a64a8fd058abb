"""Training engine: trainer, evaluator, checkpoints, optimisers and schedules, distributed helpers, reporting."""

from .checkpoint import CheckpointError, latest_checkpoint, load_model, load_train_state, save_checkpoint
from .trainer import Trainer, evaluate_checkpoint, train

__all__ = [
    "CheckpointError",
    "Trainer",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_model",
    "load_train_state",
    "save_checkpoint",
    "train",
]
