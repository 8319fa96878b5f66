"""torch's AdamW as slimopt knows it: the registry's ``"adamw"`` is ``torch.optim.AdamW`` itself (the baseline
every comparison is made against); its state formula lives here, beside the methods' own."""

from __future__ import annotations

from ..core.base import STEP_BYTES
from ..plans.param_plan import ParamInfo

__all__ = ["adamw_state_bytes"]


def adamw_state_bytes(t: ParamInfo, *, param_bytes: int = 4) -> int:
    """State bytes of one tensor: m and v in the parameter dtype, and the step."""
    return 2 * t.numel * param_bytes + STEP_BYTES
