"""Parameter plans: what each tensor is (its role, from module types, shapes, names and the model's
config), the shape facts a rule needs (out dimension, attention geometry), and the plan table that turns
a rule set into param groups carrying per-tensor metadata. Rule sets themselves belong to the optimizers
that use them."""

from .param_plan import (
    HIDDEN_ROLES,
    ROLE_FALLBACK,
    ROLES,
    ROLES_ONLY,
    BlockFacts,
    ModuleFacts,
    ParamInfo,
    ParamPlan,
    PlanRow,
    RuleSet,
    classify,
    module_facts,
)

__all__ = ["HIDDEN_ROLES", "ROLES", "ROLES_ONLY", "ROLE_FALLBACK", "BlockFacts", "ModuleFacts", "ParamInfo",
           "ParamPlan", "PlanRow", "RuleSet", "classify", "module_facts"]
