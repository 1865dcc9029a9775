"""A small BASED hybrid (convolution, taylor2 linear attention, sliding window) that trains
in a few minutes on a laptop CPU, on the embedded corpus."""

from arch.config import ModelConfig
from train.config import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="based-tiny",
        model=ModelConfig(
            vocab_size=256,
            d_model=128,
            n_layers=4,
            n_heads=4,
            mlp_dim=256,
            layers=("base_conv", "based", "base_conv", "sliding_window"),
            mixer_options={"based": {"feature_dim": 8, "parallel_max_len": 128}, "sliding_window": {"size": 64}},
            max_seq_len=1024,
        ),
        data=DataConfig(source="text", seq_len=128, batch_size=16, eval_batches=4),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=200, keep=2),
        logging=LoggingConfig(log_every=10, eval_every=200),
        steps=600,
    )
