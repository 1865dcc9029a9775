"""Flax NNX models: layers, mixers, the decoder LM and the mixer registry."""

from arch.config import ConfigError, ModelConfig
from arch.lm import LM
from arch.registry import MIXERS, mixer_names, register_mixer


def build_model(cfg: ModelConfig, seed: int = 0) -> LM:
    """A freshly initialised LM (parameters unsharded, float32)."""
    from flax import nnx

    return LM(cfg, rngs=nnx.Rngs(params=seed))


__all__ = ["ConfigError", "LM", "MIXERS", "ModelConfig", "build_model", "mixer_names", "register_mixer"]
