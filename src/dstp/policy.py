"""Decode-time policies: what decides, at each decoding step, which visual tokens the new token attends to.

A policy is one small protocol the engine drives (docs/design.md §5, docs/visionpulse.md):

- before the prefill: `prefill_pruner(pruner)`, the prefill schedule it runs on (DSTP: the given pruner; VisionPulse:
  a stage at its anchor layer that keeps every token); `probe_layer(P, L)`, the layer whose query it reads each step
  (None: none); `fills_reserve` and `reserve_slots(dropped)`, the reserve each pruned stage's KV store needs for the
  visual tokens it dropped;
- after the prefill: `setup(adapter, state, PrefillOutputs)` -> its own state (tensors only);
- each step (tensor work only, compiled into the step's graph): `noise(pstate)` drawn outside the step, then
  `step(pstate, state, q_probe, noise)`, which sees the probe layer's query and the noise, and, for a policy with
  `reads_stage_input`, also the new token's input to the first pruned stage and its rotary tables (`step(pstate,
  state, q_probe, noise, hidden [B, 1, D], cos, sin)`); it returns (StepTrace, extra FLOPs). What it
  returns to the engine it writes into the stores: per row, the active visual set of each pruned stage's layer
  range, as the validity of their slots (`activate_reserve`, `set_prompt_valid`) and K/V written through a store's
  cache view when a slot must be filled;
- after decoding: `finish(trace, pstate, steps)` (host reads); `pstate.held_bytes(HeldBytes)` reports what it holds.

Policies are registered by name like the pruners; each has a typed config.
"""
from __future__ import annotations

from dstp.config import DSTPConfig, VisionPulseConfig
from dstp.errors import ConfigError

POLICY_CONFIGS: dict[str, type] = {"dstp": DSTPConfig, "visionpulse": VisionPulseConfig}
PolicyConfig = DSTPConfig | VisionPulseConfig


def check_policy(name: str) -> str:
    if name not in POLICY_CONFIGS:
        raise ConfigError(f"unknown decode-time policy {name!r}; known: {', '.join(POLICY_CONFIGS)}")
    return name


def policy_name(config) -> str:
    """The registered name of a policy config (DSTPConfig -> dstp, VisionPulseConfig -> visionpulse)."""
    for name, cls in POLICY_CONFIGS.items():
        if isinstance(config, cls):
            return name
    known = ", ".join(c.__name__ for c in POLICY_CONFIGS.values())
    raise ConfigError(f"shift= takes a decode-time policy config ({known}), got {type(config).__name__}")


def policy_config(name: str, **fields):
    """The config of the policy `name`, from its fields."""
    return POLICY_CONFIGS[check_policy(name)](**fields)


def make_policy(config, pruner, n_layers: int):
    """The policy a config names, on top of `pruner` (a prefill pruner or None). A combination its rule does not
    define is a ConfigError."""
    name = policy_name(config)
    if name == "dstp":
        from dstp.shift import ShiftPolicy

        if pruner is None:
            raise ConfigError("DSTP needs a base pruner: pass prune=PruneConfig(...) as well")
        return ShiftPolicy(config, pruner.layer)
    from dstp.visionpulse import VisionPulsePolicy, check_anchor

    if pruner is not None:
        raise ConfigError(f"VisionPulse selects among every visual token the unpruned prefill keeps; its rule has no "
                          f"prefill pruner: drop prune= ({pruner.name})")
    check_anchor(config, n_layers)
    return VisionPulsePolicy(config)


__all__ = ["POLICY_CONFIGS", "PolicyConfig", "check_policy", "policy_name", "policy_config", "make_policy"]
