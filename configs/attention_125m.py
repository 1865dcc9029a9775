"""Softmax-attention baseline at the 125M scale (GPT-3 Small / the memory papers' smallest size).

Byte-level on a TFDS corpus prepared as ArrayRecord: pass the location with
`--set data.tfds_data_dir=...` (and `data.tfds_name`, e.g. pg19 or c4/en).
"""

from arch.config import ModelConfig
from train.config import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="attention-125m",
        model=ModelConfig(
            vocab_size=256,
            d_model=768,
            n_layers=12,
            n_heads=12,
            mlp_dim=3072,
            layers=("attention",),
            max_seq_len=4096,
            dtype="bfloat16",
        ),
        data=DataConfig(source="tfds", tfds_name="pg19", tfds_text_key="book_text", seq_len=2048, batch_size=256),
        optimizer=OptimizerConfig(lr=6e-4, warmup_steps=2000, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
        logging=LoggingConfig(log_every=50, eval_every=1000),
        steps=50_000,
        remat="dots_no_batch",
    )
