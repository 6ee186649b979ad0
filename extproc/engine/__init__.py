"""The pure engine: capacity model, accounting, priority/debt/burst, admission and queue. No I/O, no clock."""

from .decisions import Decision, Events, Reason, Verdict
from .engine import Engine
from .state import Lifecycle

__all__ = ["Decision", "Engine", "Events", "Lifecycle", "Reason", "Verdict"]
