"""Parameter plans: what each tensor is (its role, from module types, shapes, names and the model's
config: ``roles``, ``module_facts``), the shape facts a rule needs (out dimension, attention geometry:
``attention``), and the plan table that turns a rule set into param groups carrying per-tensor metadata
(``param_plan``). Rule sets themselves belong to the optimizers that use them."""

from .attention import AttentionShape
from .module_facts import ModuleFacts, module_facts
from .param_plan import ROLES_ONLY, BlockFacts, ParamInfo, ParamPlan, PlanRow, RuleSet
from .roles import HIDDEN_ROLES, ROLE_FALLBACK, ROLES, classify

__all__ = ["HIDDEN_ROLES", "ROLES", "ROLES_ONLY", "ROLE_FALLBACK", "AttentionShape", "BlockFacts", "ModuleFacts",
           "ParamInfo", "ParamPlan", "PlanRow", "RuleSet", "classify", "module_facts"]
