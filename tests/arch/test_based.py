"""The BASED mixer and hybrid LM: quadratic form, chunked and Pallas kernels and decode agree;
causality; generation; decode-state sizes; presets and the MQAR feature-dim variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import configs.mqar
from arch import ConfigError, ModelConfig, build_model
from arch.mixers.linear_attention import BasedOptions
from arch.registry import build_mixer
from eval import protocol_mqar
from kernels.testing import assert_close

VOCAB = 61
FEATURE_DIM = 4
LENGTH = 21  # not a multiple of the chunk size


def based_config(**based_options) -> ModelConfig:
    options = {"feature_dim": FEATURE_DIM, "chunk_size": 16, **based_options}
    return ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, layers=("based",), mixer_options={"based": options}
    )


# Every way the based mixer can compute its outputs; the same seed gives every one the same parameters.
FORMS = {
    "quadratic": {"parallel_max_len": 64},
    "xla": {"implementation": "xla"},
    "pallas": {"implementation": "pallas"},
    "decode": {"implementation": "reference"},
}


def new_based(cfg: ModelConfig):
    with nnx.use_eager_sharding(False):
        return build_mixer(cfg, "based", rngs=nnx.Rngs(params=0))


def based_mixer(form: str):
    return new_based(based_config(**FORMS[form]))


def run(mixer, x_BTD, form):
    if form != "decode":
        return mixer(x_BTD)
    state = mixer.init_state(x_BTD.shape[0], x_BTD.shape[1])
    outputs = []
    for t in range(x_BTD.shape[1]):
        y, state = mixer.step(x_BTD[:, t], state)
        outputs.append(y)
    return jnp.stack(outputs, axis=1)


def inputs(length=LENGTH, seed=0):
    return jax.random.normal(jax.random.key(seed), (2, length, 32))


@pytest.fixture(scope="module")
def quadratic_outputs_and_gradients():
    return outputs_and_gradients("quadratic")


def outputs_and_gradients(form):
    graphdef, params = nnx.split(based_mixer(form), nnx.Param)
    x = inputs()
    cotangent = jax.random.normal(jax.random.key(5), x.shape)

    def loss(params, x):
        y = run(nnx.merge(graphdef, params), x, form)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


def test_based_defaults_are_the_papers():
    options = BasedOptions()
    assert (options.feature_map, options.feature_dim, options.normalize, options.eps) == ("taylor2", 16, True, 1e-12)
    mixer = new_based(ModelConfig(d_model=64, n_heads=2, layers=("based",)))
    assert mixer.feature_dim == 16 and mixer.kernel_feature_map == "taylor2"


def test_quadratic_form_is_taylor2_only():
    with pytest.raises(ConfigError, match=r"model\.mixer_options\.based\.parallel_max_len"):
        based_config(feature_map="elu1", parallel_max_len=8)
    with pytest.raises(ConfigError, match=r"model\.mixer_options\.linear_attention\.parallel_max_len"):
        ModelConfig(layers=("linear_attention",), mixer_options={"linear_attention": {"parallel_max_len": 8}})


@pytest.mark.parametrize("form", ["xla", "pallas", "decode"])
def test_every_form_matches_the_quadratic_form_in_values_and_gradients(form, quadratic_outputs_and_gradients):
    want_y, (want_params, want_x) = quadratic_outputs_and_gradients
    y, (d_params, d_x) = outputs_and_gradients(form)
    assert_close(y, want_y, tol=1e-5, name=f"{form} y")
    assert_close(d_x, want_x, tol=1e-5, name=f"{form} dx")
    want_leaves = jax.tree.leaves(want_params)
    for (path, got), want in zip(jax.tree.leaves_with_path(d_params), want_leaves, strict=True):
        assert_close(got, want, tol=1e-5, name=f"{form} d{jax.tree_util.keystr(path)}")


def test_lengths_up_to_parallel_max_len_use_the_quadratic_form_and_longer_ones_the_kernel():
    mixer = new_based(based_config(parallel_max_len=LENGTH))
    kernel_only = based_mixer("xla")
    x = inputs(length=LENGTH + 1)
    # Past the limit both run the same chunked kernel: equal to the last bit.
    np.testing.assert_array_equal(mixer(x), kernel_only(x))
    assert not np.array_equal(mixer(x[:, :LENGTH]), kernel_only(x[:, :LENGTH]))
    assert_close(mixer(x[:, :LENGTH]), kernel_only(x[:, :LENGTH]), tol=1e-5, name="y")


@pytest.mark.parametrize("form", ["quadratic", "xla"])
def test_changing_a_token_never_changes_earlier_outputs(form):
    mixer = based_mixer(form)
    x = inputs()
    base = mixer(x)
    for t in (0, 9, LENGTH - 1):
        out = mixer(x.at[:, t].add(1.0))
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not np.allclose(out[:, t], base[:, t])


def hybrid_config(parallel_max_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=3,
        n_heads=2,
        mlp_dim=64,
        layers=("base_conv", "based", "sliding_window"),
        mixer_options={
            "based": {"feature_dim": FEATURE_DIM, "chunk_size": 8, "parallel_max_len": parallel_max_len},
            "sliding_window": {"size": 4},
        },
        max_seq_len=64,
    )


@pytest.mark.parametrize("parallel_max_len", [0, 64])
def test_greedy_generation_is_the_argmax_of_parallel_logits_step_by_step(parallel_max_len):
    model = build_model(hybrid_config(parallel_max_len), seed=2)
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, VOCAB)
    new = model.generate(prompt, 8)
    assert new.shape == (2, 8)
    parallel = nnx.jit(lambda model, tokens: model(tokens))(model, jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(parallel[:, 4:-1], axis=-1)), np.asarray(new))


def test_state_bytes_match_the_taylor2_formula_and_the_window_bounds_the_kv_cache():
    model = build_model(hybrid_config(0))
    based, window = model.blocks[1].mixer, model.blocks[2].mixer
    features = 1 + FEATURE_DIM + FEATURE_DIM**2
    head_dim, heads, f32 = 16, 2, 4
    per_head = features * head_dim + features  # S [F, Dv] and the normaliser z [F]
    assert based.state_bytes(3, 10) == based.state_bytes(3, 100_000) == 3 * heads * per_head * f32
    state = based.init_state(3, 100_000)
    assert sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)) == 3 * heads * per_head * f32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))

    per_token = 2 * heads * head_dim * f32  # k and v
    assert window.state_bytes(1, 3) == 3 * per_token
    assert window.state_bytes(1, 4) == window.state_bytes(1, 100_000) == 4 * per_token
    cache = window.init_state(1, 100_000)
    assert cache.k.shape[1] <= 4 and cache.v.shape[1] <= 4


@pytest.mark.parametrize("name, based_at, window_at", [
    ("based-360m", (1, 6, 11, 16, 21), (2, 7, 12, 17, 22)),
    ("based-1-3b", (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34)),
])
def test_presets_place_the_mixers_as_the_paper(name, based_at, window_at):
    model = configs.get_preset(name).model
    at = lambda mixer: tuple(i + 1 for i, m in enumerate(model.layer_mixers) if m == mixer)  # noqa: E731
    assert (at("based"), at("sliding_window")) == (based_at, window_at)
    assert set(model.layer_mixers) == {"based", "sliding_window", "base_conv"}
    assert model.resolved_mlp_dim == 2 * model.d_model
    assert model.mixer_options["sliding_window"]["size"] == 256


@pytest.mark.parametrize("dim", [8, 16, 24])
def test_mqar_feature_dim_variants_build_the_based_mixer(dim):
    grid = protocol_mqar.MqarGrid(
        mixers=(f"based-f{dim}",), d_models=(64,), seq_lens=(64,), kv_pairs=(4,), lrs=(1e-3,),
        mixer_settings=configs.mqar.MIXER_SETTINGS,
    )
    point = protocol_mqar.grid_points(grid)[0]
    model = protocol_mqar.train_config(grid, point, 1e-3).model
    assert model.layers == ("base_conv", "based")
    assert model.mixer_options["based"]["feature_dim"] == dim
