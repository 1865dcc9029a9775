"""BaseConv: causality, decode == parallel, chunked prefill, packed segments, state size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import ConfigError, ModelConfig, build_model
from arch.registry import build_mixer

D_MODEL = 16


def mixer_config(**options) -> ModelConfig:
    return ModelConfig(
        vocab_size=31,
        d_model=D_MODEL,
        n_layers=2,
        n_heads=2,
        layers=("base_conv", "attention"),
        mixer_options={"base_conv": options} if options else {},
        max_seq_len=64,
    )


def make_mixer(cfg=None, **options):
    # Outside an LM there is no mesh: build the parameters unsharded, as LM does.
    with nnx.use_eager_sharding(False):
        return build_mixer(cfg or mixer_config(**options), "base_conv", rngs=nnx.Rngs(params=3))


def inputs(batch=2, length=12, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_changing_a_token_changes_only_it_and_the_next_kernel_size_minus_one(kernel_size):
    mixer = make_mixer(kernel_size=kernel_size)
    x = inputs()
    base = mixer(x)
    t = 5
    out = mixer(x.at[:, t].add(1.0))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t], base[:, t])
    # The gate reads only the current token, the convolution the last kernel_size ones.
    np.testing.assert_allclose(out[:, t + kernel_size :], base[:, t + kernel_size :], atol=1e-6)


def test_token_by_token_decode_reproduces_the_parallel_form():
    mixer = make_mixer()
    x = inputs(length=9)
    parallel = mixer(x)
    state = mixer.init_state(2, 9)
    for t in range(9):
        y, state = mixer.step(x[:, t], state)
        np.testing.assert_allclose(y, parallel[:, t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunks", [((0, 1), (1, 2), (2, 11)), ((0, 5), (5, 11)), ((0, 11),)])
def test_chunked_prefill_reproduces_the_parallel_form(chunks):
    mixer = make_mixer(kernel_size=4)
    x = inputs(length=11)
    state = mixer.init_state(2, 11)
    outputs = []
    for start, stop in chunks:
        y, state = mixer.prefill(x[:, start:stop], state)
        outputs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), mixer(x), atol=1e-6, rtol=1e-5)


def test_packed_segments_do_not_read_each_other():
    mixer = make_mixer()
    a, b = inputs(batch=1, length=5, seed=1), inputs(batch=1, length=6, seed=2)
    packed = mixer(jnp.concatenate([a, b], axis=1), segment_ids=jnp.array([[1] * 5 + [2] * 6]))
    np.testing.assert_allclose(packed[:, :5], mixer(a), atol=1e-6)
    np.testing.assert_allclose(packed[:, 5:], mixer(b), atol=1e-6)


@pytest.mark.parametrize("kernel_size,expand,dtype", [(3, 2, "float32"), (4, 4, "bfloat16"), (1, 2, "float32")])
def test_state_bytes_is_kernel_size_minus_one_inputs_at_every_length(kernel_size, expand, dtype):
    cfg = mixer_config(kernel_size=kernel_size, expand=expand).replace(dtype=dtype)
    mixer = make_mixer(cfg)
    itemsize = jnp.dtype(dtype).itemsize
    inner = expand * D_MODEL // 2
    for batch, length in [(1, 1), (3, 100), (2, 10_000)]:
        expected = batch * (kernel_size - 1) * inner * itemsize
        assert mixer.state_bytes(batch, length) == expected
    state = mixer.init_state(3, 100)
    assert state.size * state.dtype.itemsize == mixer.state_bytes(3, 100)


def test_in_a_model_decoding_matches_the_parallel_logits_and_the_state_size_adds_up():
    model = build_model(mixer_config(), seed=1)
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 31)
    parallel = model(tokens)
    step = nnx.jit(lambda model, token, state: model.step(token, state))
    state = model.init_state(2, 10)
    for t in range(10):
        logits, state = step(model, tokens[:, t], state)
        np.testing.assert_allclose(logits, parallel[:, t], atol=2e-5, rtol=1e-5)
    attention_bytes = 2 * 2 * 10 * D_MODEL * 4  # keys and values, batch 2, 10 tokens, float32
    assert model.state_bytes(2, 10) == 2 * 2 * D_MODEL * 4 + attention_bytes


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match=r"model\.mixer_options\.base_conv\.kernel_size"):
        mixer_config(kernel_size=0)
    with pytest.raises(ConfigError, match=r"model\.mixer_options\.base_conv\.expand"):
        ModelConfig(d_model=15, n_heads=1, layers=("base_conv",), mixer_options={"base_conv": {"expand": 1}})
