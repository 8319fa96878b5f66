"""Memory: exact optimizer-state bytes (``state_bytes``), the analytic per-tensor formulas and the table
``slimopt memory`` prints (``formulas``), the published-model catalogue (``models``) and the GPU fit
planner behind ``slimopt plan`` (``fit``)."""

from .state_bytes import state_bytes, state_bytes_by_key

__all__ = ["state_bytes", "state_bytes_by_key"]
