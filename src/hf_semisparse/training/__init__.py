"""Prune-and-recover training: a callback for any Trainer, and a drop-in Trainer subclass."""

from .callback import SparsityCallback
from .trainer import SparsityTrainer, SparsityTrainingArguments

__all__ = ["SparsityCallback", "SparsityTrainer", "SparsityTrainingArguments"]
