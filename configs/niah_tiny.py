"""A small attention model trained on single-needle retrieval (word-level, repeated-noise haystack).

Trains in minutes on a CPU at 128 tokens; then score it on longer contexts, e.g.
`memzoo eval niah --checkpoint runs/niah-tiny --lengths 128,256,512 --depths 0:1:5`.
"""

from arch.config import ModelConfig
from train.config import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="niah-tiny",
        model=ModelConfig(
            vocab_size=192,
            d_model=64,
            n_layers=2,
            n_heads=2,
            layers=("attention",),
            max_seq_len=1024,
        ),
        data=DataConfig(
            source="niah",
            seq_len=128,
            batch_size=16,
            eval_batches=4,
            task={"variant": "single", "haystack": "noise", "vocabulary": "words"},
        ),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=200, keep=2),
        logging=LoggingConfig(log_every=10, eval_every=100),
        steps=600,
    )
