"""Memory: exact optimizer-state bytes measured on an optimizer (``measured``: ``state_bytes``), the analytic
per-tensor formulas and the table ``slimopt memory`` prints (``formulas``), the published-model catalogue
(``models``) and the GPU fit report behind ``slimopt plan`` (``fit``)."""

from .measured import state_bytes, state_bytes_by_key

__all__ = ["state_bytes", "state_bytes_by_key"]
