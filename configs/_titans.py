"""The Titans presets' shared numbers (Behrouz, Zhong, Mirrokni, 2025): one place for the four
variants at the paper's 170M and 340M settings and as tiny CPU models.

Variants: "lmm" (the memory as every block's mixer), "mag" (memory as a gate), "mac" (memory
as a context) and "mal" (memory as a layer: [P ‖ x] -> memory -> sliding-window attention,
alternating blocks, persistent tokens in both).
"""

from arch.config import ModelConfig
from train.config import CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, TrainConfig

VARIANTS = ("lmm", "mag", "mac", "mal")
PERSISTENT_TOKENS = 4  # the N_p


def _mixers(variant: str, *, attention_span: int, chunk_size: int) -> tuple[tuple[str, ...], dict]:
    """The layer pattern and mixer options of a variant; attention_span is MAG's and MAL's window
    and MAC's segment length."""
    memory = {"depth": 2, "chunk_size": chunk_size}
    if variant == "lmm":
        return ("titans_lmm",), {"titans_lmm": memory}
    if variant == "mag":
        return ("titans_mag",), {"titans_mag": {**memory, "window": attention_span, "persistent_tokens": PERSISTENT_TOKENS}}
    if variant == "mac":
        return ("titans_mac",), {"titans_mac": {**memory, "segment_len": attention_span, "persistent_tokens": PERSISTENT_TOKENS}}
    if variant == "mal":
        return ("titans_lmm", "sliding_window"), {
            "titans_lmm": {**memory, "persistent_tokens": PERSISTENT_TOKENS},
            "sliding_window": {"size": attention_span, "persistent_tokens": PERSISTENT_TOKENS},
        }
    raise ValueError(f"unknown Titans variant {variant!r}; expected one of {VARIANTS}")


# The paper's language-modelling sizes. Heads are 64 wide.
SIZES = {
    "170m": {"d_model": 768, "n_layers": 12, "n_heads": 12},
    "340m": {"d_model": 1024, "n_layers": 24, "n_heads": 16},
}


def paper_config(variant: str, size: str) -> TrainConfig:
    """The paper's setting: 4K context, 32K vocabulary, AdamW at 4e-4 with cosine decay and weight decay
    0.1, 15B tokens (about 0.5M tokens a step).

    The window (MAG, MAL) and segment (MAC) are 512 tokens, the attention span of the hybrid baselines
    the paper compares with: at 4K context, 7/8 of what a token can use reaches it only through the
    memory. Chunks of 64 divide the segment, so every segment starts at a chunk boundary.
    vocab_size is the paper's Llama 2 tokenizer; give its SentencePiece model with
    `--set data.tokenizer=sentencepiece --set data.spm_model=PATH` (byte tokens fit as well).
    """
    layers, mixer_options = _mixers(variant, attention_span=512, chunk_size=64)
    return TrainConfig(
        name=f"titans-{variant}-{size}",
        model=ModelConfig(
            vocab_size=32_000,
            **SIZES[size],
            layers=layers,
            mixer_options=mixer_options,
            max_seq_len=4096,
            dtype="bfloat16",
        ),
        data=DataConfig(source="tfds", tfds_name="pg19", tfds_text_key="book_text", seq_len=4096, batch_size=128),
        optimizer=OptimizerConfig(lr=4e-4, warmup_steps=1000, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
        logging=LoggingConfig(log_every=50, eval_every=1000),
        steps=30_000,
        remat="dots_no_batch",
    )


def tiny_config(variant: str) -> TrainConfig:
    """A small model that trains in a few minutes on a CPU, on the embedded corpus: 128 wide, 4 blocks,
    windows and segments of 32 tokens (4 segments a sequence), chunks of 16."""
    layers, mixer_options = _mixers(variant, attention_span=32, chunk_size=16)
    if variant == "mac":
        # MAC's memory learns from x + W_a·Attn; at this learning rate its depth-2 memory's
        # inner steps outgrew the stable bound C·θ·λ < 2(1 + η) (see MemoryOptions) within
        # 40 steps at theta_max 0.01 and 0.003, and stay inside it at 0.001.
        mixer_options["titans_mac"]["theta_max"] = 0.001
    return TrainConfig(
        name=f"titans-{variant}-tiny",
        model=ModelConfig(
            vocab_size=256,
            d_model=128,
            n_layers=4,
            n_heads=4,
            mlp_dim=256,
            layers=layers,
            mixer_options=mixer_options,
            max_seq_len=1024,
        ),
        data=DataConfig(source="text", seq_len=128, batch_size=8, eval_batches=4),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=100, keep=2),
        logging=LoggingConfig(log_every=10, eval_every=100),
        steps=300,
    )
