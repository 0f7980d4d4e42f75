"""Planning a run: :func:`plan` makes every decision and runs every check once, before any compute,
and returns the immutable :class:`RunPlan` that the drivers execute."""

from .build import plan, stream_blocker
from .model import ModelHandle, RunPlan
from .targets import TargetPlan, TargetStep

__all__ = ["ModelHandle", "RunPlan", "TargetPlan", "TargetStep", "plan", "stream_blocker"]
