"""The decoder LM and its attention mixers: causality, decode == parallel, generation, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import LM, ConfigError, ModelConfig, build_model, mixer_names

VOCAB = 61


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(changes)
    return ModelConfig(**base)


MODEL_CASES = {
    "attention": tiny_config(),
    "attention_gqa": tiny_config(n_kv_heads=2),
    "sliding_window": tiny_config(layers=("sliding_window",), mixer_options={"sliding_window": {"size": 4}}),
    "hybrid_untied": tiny_config(
        n_layers=4,
        layers=("sliding_window", "attention"),
        mixer_options={"sliding_window": {"size": 3}},
        tie_embeddings=False,
    ),
    "attention_no_mlp": tiny_config(mlp=False),
    "linear_elu1": tiny_config(layers=("linear_attention",), mixer_options={"linear_attention": {"chunk_size": 4}}),
    "linear_identity_taylor2_hybrid": tiny_config(
        n_layers=2,
        layers=("linear_attention", "sliding_window"),
        mixer_options={
            "linear_attention": {"feature_map": "taylor2", "feature_dim": 4, "chunk_size": 8},
            "sliding_window": {"size": 4},
        },
    ),
    "linear_identity_unnormalized": tiny_config(
        layers=("linear_attention",), mixer_options={"linear_attention": {"feature_map": "identity", "normalize": False}}
    ),
}


@pytest.fixture(params=sorted(MODEL_CASES))
def model(request) -> LM:
    return build_model(MODEL_CASES[request.param], seed=1)


@nnx.jit
def forward(model, tokens_BT, segment_ids=None):
    return model(tokens_BT, segment_ids=segment_ids)


@nnx.jit
def prefill(model, tokens_BT, state):
    return model.prefill(tokens_BT, state)


@nnx.jit
def step(model, token_B, state):
    return model.step(token_B, state)


def tokens(batch=2, length=13, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def test_causal_changing_a_token_never_changes_earlier_outputs(model):
    x = tokens()
    base = forward(model, x)
    for t in (0, 5, 12):
        changed = x.at[:, t].set((x[:, t] + 7) % VOCAB)
        out = forward(model, changed)
        # Chunked kernels may round differently when a later token changes, never by more.
        np.testing.assert_allclose(np.asarray(out[:, :t]), np.asarray(base[:, :t]), rtol=0, atol=1e-6)
        assert not np.allclose(out[:, t:], base[:, t:]), "the changed token must influence its own position"


def test_token_by_token_decode_reproduces_parallel_logits(model):
    x = tokens(length=11)
    parallel = forward(model, x)
    state = model.init_state(2, 11)
    for t in range(11):
        logits, state = step(model, x[:, t], state)
        np.testing.assert_allclose(logits, parallel[:, t], atol=2e-5, rtol=1e-5)


def test_chunked_prefill_then_decode_reproduces_parallel_logits(model):
    x = tokens(length=14)
    parallel = forward(model, x)
    state = model.init_state(2, 14)
    outputs = []
    for start, stop in ((0, 5), (5, 6), (6, 13)):
        logits, state = prefill(model, x[:, start:stop], state)
        outputs.append(logits)
    logits, state = step(model, x[:, 13], state)
    outputs.append(logits[:, None])
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), parallel, atol=2e-5, rtol=1e-5)


def test_greedy_generation_is_the_argmax_of_parallel_logits_step_by_step(model):
    prompt = tokens(length=5, seed=3)
    new = model.generate(prompt, 8)
    assert new.shape == (2, 8)
    full = jnp.concatenate([prompt, new], axis=1)
    parallel = forward(model, full)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(parallel[:, 4:-1], axis=-1)), np.asarray(new))


def test_sampled_generation_is_seeded_and_stays_in_vocab():
    model = build_model(MODEL_CASES["attention"])
    prompt = tokens(length=3)
    a = model.generate(prompt, 6, rng=jax.random.key(1), temperature=1.0, top_k=5)
    b = model.generate(prompt, 6, rng=jax.random.key(1), temperature=1.0, top_k=5)
    np.testing.assert_array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


def test_generation_past_max_seq_len_is_refused():
    model = build_model(tiny_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens(length=10), 7)


def test_segment_ids_isolate_packed_sequences():
    model = build_model(MODEL_CASES["attention"])
    a, b = tokens(batch=1, length=6, seed=1), tokens(batch=1, length=7, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 7])
    out = forward(model, packed, segments)
    np.testing.assert_allclose(out[:, :6], forward(model, a), atol=2e-5)
    np.testing.assert_allclose(out[:, 6:], forward(model, b), atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_leaves_values_and_gradients_unchanged(policy):
    model = build_model(MODEL_CASES["attention"])
    x = tokens()
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, remat):
        return jnp.mean(nnx.merge(graphdef, params)(x, remat=remat) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_value, base_grad = value_and_grad(params, "none")
    value, grad = value_and_grad(params, policy)
    np.testing.assert_allclose(value, base_value, rtol=1e-6)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, atol=1e-6, rtol=1e-5), grad, base_grad)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build_model(tiny_config(dtype="bfloat16"))
    params = nnx.state(model, nnx.Param)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert forward(model, tokens()).dtype == jnp.float32


def test_parameters_carry_logical_axis_names():
    model = build_model(MODEL_CASES["hybrid_untied"])
    axes = {
        tuple(str(name) for name in v.get_metadata().get("out_sharding", ()))
        for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
    }
    assert ("vocab", "embed") in axes and ("embed", "vocab") in axes
    assert ("embed", "heads") in axes and ("heads", "embed") in axes
    assert ("embed", "mlp") in axes and ("mlp", "embed") in axes
    assert ("embed",) in axes


def test_state_bytes_match_the_kv_cache_formula():
    cfg = MODEL_CASES["hybrid_untied"]  # 2 windowed (size 3) and 2 full layers, 4 kv heads of dim 8
    model = build_model(cfg)
    per_token = 2 * 4 * 8 * 4  # k and v, heads, head dim, float32 bytes
    assert model.state_bytes(1, 10) == 2 * 10 * per_token + 2 * 3 * per_token


def test_linear_attention_state_bytes_are_constant_and_match_the_formula():
    model = build_model(MODEL_CASES["linear_identity_taylor2_hybrid"])
    linear = model.blocks[0].mixer
    features = 1 + 4 + 16  # taylor2 over feature dim 4
    expected = 2 * 4 * (features * 8 + features) * 4  # batch, heads, S and z per head, float32
    assert linear.state_bytes(2, 10) == linear.state_bytes(2, 10_000) == expected


def test_registry_lists_the_baselines():
    assert {"attention", "sliding_window", "linear_attention"} <= set(mixer_names())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"layers": ("atention",)}, "model.layers"),
        ({"n_heads": 5}, "model.n_heads"),
        ({"n_kv_heads": 3}, "model.n_kv_heads"),
        ({"n_layers": 3, "layers": ("attention", "sliding_window")}, "model.layers"),
        ({"mixer_options": {"attention": {"windw": 3}}}, "model.mixer_options.attention.windw"),
        ({"layers": ("sliding_window",), "mixer_options": {"sliding_window": {"size": 0}}}, "model.mixer_options.sliding_window.size"),
        ({"mixer_options": {"sliding_window": {"size": 4}}}, "model.mixer_options.sliding_window"),
        ({"dtype": "float64"}, "model.dtype"),
    ],
)
def test_bad_model_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(**changes)


def test_unknown_mixer_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        tiny_config(layers=("atention",))
