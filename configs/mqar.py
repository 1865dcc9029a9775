"""MQAR (zoology's multi-query associative recall): the `memzoo bench mqar` grids and a training preset.

Models follow zoology's MQAR models: two blocks, a BaseConv (short convolution) block
then the mixer's block, no MLP, tied embeddings, and no position embeddings in the
attention mixers (the convolution gives the positional signal), one head.
`memzoo train --config mqar` trains the attention model at length 64 with 4 pairs.
"""

from arch.config import ModelConfig
from train.config import DataConfig, LoggingConfig, OptimizerConfig, TrainConfig

_TITANS_MQAR = {"depth": 1, "chunk_size": 8, "theta_max": 0.1}

# Per bench name: ModelConfig fields of its MQAR model, and "mixer" when the name is a variant
# of a registered mixer (`--mixers based-f8`). Names not listed are mixers with one head and defaults.
MIXER_SETTINGS = {
    "attention": {"n_heads": 1, "mixer_options": {"attention": {"rope": False}}},
    "sliding_window": {"n_heads": 1, "mixer_options": {"sliding_window": {"size": 16, "rope": False}}},
    "based": {"n_heads": 1, "mixer_options": {"based": {"feature_dim": 16}}},
    # The feature-map baselines BASED is compared with, at the model's head dim. The identity
    # map is unnormalised, as in zoology: q . sum(k) changes sign, so dividing by it diverges.
    **{
        f"linear_attention-{feature_map}": {
            "mixer": "linear_attention",
            "n_heads": 1,
            "mixer_options": {"linear_attention": {"feature_map": feature_map, "normalize": normalize}},
        }
        for feature_map, normalize in (("elu1", True), ("identity", False))
    },
    # BASED's MQAR sweep over the taylor2 feature dim (its state grows as 1 + d' + d'^2).
    **{
        f"based-f{dim}": {"mixer": "based", "n_heads": 1, "mixer_options": {"based": {"feature_dim": dim}}}
        for dim in (8, 16, 24)
    },
    # Titans at MQAR's widths: a matrix memory (depth 1; `titans_lmm-deep` is the paper's depth 2, about
    # 5x slower per step on a CPU), chunks of 8 tokens so the memory writes often at these lengths, and
    # theta_max 0.1: the stable bound C·θ·λ < 2(1 + η) (see MemoryOptions) allows about 0.1 at C = 8,
    # and the default 0.01, set for C = 64, leaves the memory too weak to learn the task in this budget.
    # MAC's segments of 8 tokens: at length 64 the 4 pairs fill the first segment, so every query
    # is answered through the memory, not by attention within a segment.
    "titans_lmm": {"n_heads": 1, "mixer_options": {"titans_lmm": _TITANS_MQAR}},
    "titans_lmm-deep": {
        "mixer": "titans_lmm",
        "n_heads": 1,
        "mixer_options": {"titans_lmm": {**_TITANS_MQAR, "depth": 2}},
    },
    "titans_mac": {
        "n_heads": 1,
        "mixer_options": {"titans_mac": {**_TITANS_MQAR, "segment_len": 8, "rope": False}},
    },
    # The paper's ablations (its Table 5) of the memory's momentum and its forgetting.
    **{
        f"titans_lmm-no-{name}": {
            "mixer": "titans_lmm",
            "n_heads": 1,
            "mixer_options": {"titans_lmm": {**_TITANS_MQAR, field: False}},
        }
        for name, field in (("momentum", "momentum"), ("decay", "weight_decay"))
    },
}

# zoology's MQAR sweep: lengths 64..512 with a pair per 16 tokens, widths 64..256, 4 learning rates.
FULL = {
    "mixers": ("attention", "sliding_window", "linear_attention"),
    "d_models": (64, 128, 256),
    "seq_lens": (64, 128, 256, 512),
    "kv_pairs": (4, 8, 16, 32),
    "lrs": (1e-3, 3.2e-3, 1e-2, 3.2e-2),
    "vocab_size": 8192,
    "train_examples": 100_000,
    "test_examples": 1_024,
    "batch_size": 256,
    "epochs": 32,
    "test_length_factors": (2,),
}

# About ten minutes on a two-core CPU: one width and length, two learning rates, a short budget
# that attention meets (early stop at 0.99) and the fixed-state mixers cannot. The one-epoch
# warmup lets the higher learning rate train stably in so few steps.
QUICK = {
    "mixers": ("attention", "sliding_window", "linear_attention"),
    "d_models": (64,),
    "seq_lens": (64,),
    "kv_pairs": (4,),
    "lrs": (3e-3, 1e-2),
    "vocab_size": 8192,
    "train_examples": 8_000,
    "test_examples": 512,
    "batch_size": 64,
    "epochs": 8,
    "warmup_epochs": 1.0,
    "test_length_factors": (2,),
}


def get_config() -> TrainConfig:
    return TrainConfig(
        name="mqar",
        model=ModelConfig(
            vocab_size=8192,
            d_model=64,
            n_layers=2,
            n_heads=1,
            layers=("base_conv", "attention"),
            mlp=False,
            mixer_options=MIXER_SETTINGS["attention"]["mixer_options"],
            max_seq_len=128,
        ),
        data=DataConfig(
            source="mqar",
            seq_len=64,
            batch_size=64,
            eval_batches=8,
            task={"vocab_size": 8192, "num_kv_pairs": 4, "num_train_examples": 100_000, "num_eval_examples": 1_000},
        ),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=100, min_lr_ratio=0.0, b2=0.999, weight_decay=0.1, grad_clip=0.0),
        logging=LoggingConfig(log_every=20, eval_every=200),
        steps=3_000,
    )
