"""The gated delta rule (DeltaNet / Gated DeltaNet memory): reference, chunked XLA, Pallas."""

from kernels.delta_rule.api import delta_rule, delta_rule_step, l2_normalize

__all__ = ["delta_rule", "delta_rule_step", "l2_normalize"]
