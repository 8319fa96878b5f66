"""Shared bookkeeping below every optimizer: the base class (param groups with names, validation, lazy
state, non-finite policy, dtype-safe ``load_state_dict``) and the distributed helpers (DTensor shapes,
shards, partial sums plus one all-reduce). Nothing here knows any particular optimizer."""
