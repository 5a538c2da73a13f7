"""Training: the step (one ``TrainStep`` for training and bench), the epoch loop, optimiser and schedule,
EMA, resume, tracking, and :func:`train` (one run). ``python -m pipeline.train`` runs ``__main__``."""
from pipeline.train.trainer import TrainingInterrupted, train

__all__ = ["TrainingInterrupted", "train"]
