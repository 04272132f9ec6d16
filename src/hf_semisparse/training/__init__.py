"""Prune-and-recover training: a callback for any Trainer, a drop-in Trainer subclass, and distillation data
sampled from the dense teacher."""

from .callback import SparsityCallback
from .teacher_data import sample_teacher_sequences
from .trainer import SparsityTrainer, SparsityTrainingArguments

__all__ = ["SparsityCallback", "SparsityTrainer", "SparsityTrainingArguments", "sample_teacher_sequences"]
