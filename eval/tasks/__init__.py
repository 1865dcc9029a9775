"""Seeded synthetic tasks with random access by index. Importing this package registers them as
data sources ("mqar", "passkey", "niah") for the training loop."""

from eval.tasks import mqar, niah, passkey
from eval.tasks.common import NeedleSample, NeedleTask, score_answer

# The tasks `memzoo eval` scores a checkpoint on.
NEEDLE_TASKS: dict[str, type[NeedleTask]] = {"passkey": passkey.Passkey, "niah": niah.Niah}

__all__ = ["NEEDLE_TASKS", "NeedleSample", "NeedleTask", "mqar", "niah", "passkey", "score_answer"]
