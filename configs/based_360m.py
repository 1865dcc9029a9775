"""BASED at the 360M scale (Arora et al., 2024): 27 blocks of gated short convolutions,
taylor2 linear attention and sliding-window attention, SwiGLU MLPs of width 2 * d_model.

Byte-level on a TFDS corpus prepared as ArrayRecord: pass the location with
`--set data.tfds_data_dir=...` (and `data.tfds_name`, e.g. pg19 or c4/en).
"""

from arch.config import ModelConfig
from train.config import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, TrainConfig

# Blocks 1, 6, 11, 16, 21 (counting from 1) are linear attention, 2, 7, 12, 17, 22 sliding window.
LAYERS = (
    "based", "sliding_window", "base_conv", "base_conv", "base_conv",  # 1-5
    "based", "sliding_window", "base_conv", "base_conv", "base_conv",  # 6-10
    "based", "sliding_window", "base_conv", "base_conv", "base_conv",  # 11-15
    "based", "sliding_window", "base_conv", "base_conv", "base_conv",  # 16-20
    "based", "sliding_window", "base_conv", "base_conv", "base_conv",  # 21-25
    "base_conv", "base_conv",  # 26-27
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="based-360m",
        model=ModelConfig(
            vocab_size=256,
            d_model=1024,
            n_layers=27,
            n_heads=16,
            mlp_dim=2048,
            layers=LAYERS,
            mixer_options={"based": {"feature_dim": 16}, "sliding_window": {"size": 256}},
            max_seq_len=4096,
            dtype="bfloat16",
        ),
        data=DataConfig(source="tfds", tfds_name="pg19", tfds_text_key="book_text", seq_len=2048, batch_size=256),
        optimizer=OptimizerConfig(lr=8e-4, warmup_steps=2000, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
        logging=LoggingConfig(log_every=50, eval_every=1000),
        steps=100_000,
        remat="dots_no_batch",
    )
