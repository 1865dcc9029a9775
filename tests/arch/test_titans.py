"""The Titans mixers and presets: decode == parallel (LMM, MAG, MAL, MAC), causality (MAC across
segments too), config errors, decode-state sizes, generation, and a preset that trains and resumes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import configs.mqar
from arch import ConfigError, ModelConfig, build_model
from arch.mixers.titans import TitansLMMOptions
from eval import protocol_mqar
from kernels.testing import assert_close
from train import loop
from train.config import CheckpointConfig, DataConfig, LoggingConfig, MeshConfig

VOCAB = 61
LENGTH = 13  # odd, not a multiple of any chunk or segment below
PROMPT = 5  # prefill an odd length, then step


def model_config(layers, mixer_options, **changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=16, n_layers=len(layers), n_heads=2, mlp_dim=32, max_seq_len=64)
    return ModelConfig(**{**base, "layers": layers, "mixer_options": mixer_options, **changes})


# Tiny chunks and segments so a 13-token sequence crosses several of each.
CASES = {
    "lmm": model_config(("titans_lmm",), {"titans_lmm": {"chunk_size": 4}}),
    "mag": model_config(("titans_mag",), {"titans_mag": {"chunk_size": 4, "window": 5, "persistent_tokens": 3}}),
    "mal": model_config(
        ("titans_lmm", "sliding_window"),
        {
            # The ablations: a matrix memory without momentum or short convolutions.
            "titans_lmm": {
                "chunk_size": 3,
                "persistent_tokens": 2,
                "depth": 1,
                "momentum": False,
                "conv_size": 0,
                "output_gate": "sigmoid",
            },
            "sliding_window": {"size": 4, "persistent_tokens": 2},
        },
    ),
    "mac": model_config(("titans_mac",), {"titans_mac": {"chunk_size": 2, "segment_len": 4, "persistent_tokens": 2}}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param, build_model(CASES[request.param], seed=1)


@nnx.jit
def forward(model, tokens_BT):
    return model(tokens_BT)


@nnx.jit
def prefill(model, tokens_BT, state):
    return model.prefill(tokens_BT, state)


@nnx.jit
def step(model, token_B, state):
    return model.step(token_B, state)


def tokens(length=LENGTH, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, length), 0, VOCAB)


def test_prefill_then_steps_equal_the_parallel_form(case):
    name, model = case
    x = tokens()
    want = forward(model, x)
    logits, state = prefill(model, x[:, :PROMPT], model.init_state(2, LENGTH))
    got = [logits]
    for t in range(PROMPT, LENGTH):
        logits, state = step(model, x[:, t], state)
        got.append(logits[:, None])
    assert_close(jnp.concatenate(got, axis=1), want, tol=1e-5, name=f"{name} decode logits")


@pytest.mark.parametrize("pieces", [(4, 3, 6), (8, 5)])
def test_mac_prefill_in_pieces_equals_the_parallel_form(pieces):
    # Segments of 4: a piece that starts on a segment boundary runs its whole segments in
    # parallel; one that starts inside a segment (after 4 + 3 tokens) goes token by token.
    model = build_model(CASES["mac"], seed=1)
    x = tokens()
    want = forward(model, x)
    state, got, start = model.init_state(2, LENGTH), [], 0
    for size in pieces:
        logits, state = prefill(model, x[:, start : start + size], state)
        got.append(logits)
        start += size
    assert_close(jnp.concatenate(got, axis=1), want, tol=1e-5, name="mac logits prefilled in pieces")


def test_changing_a_token_never_changes_earlier_outputs(case):
    name, model = case
    x = tokens()
    base = forward(model, x)
    # For MAC (segments of 4): 2 and 3 end segments early, 5 is inside a later one.
    for t in (0, 2, 3, 5, LENGTH - 1):
        out = forward(model, x.at[:, t].set((x[:, t] + 7) % VOCAB))
        np.testing.assert_allclose(np.asarray(out[:, :t]), np.asarray(base[:, :t]), rtol=0, atol=1e-6)
        assert not np.allclose(out[:, t], base[:, t]), f"{name}: token {t} must change its own output"
        if name.startswith("mac") and t < 4:
            # Through the memory, a segment reaches the later segments.
            assert not np.allclose(out[:, 8:], base[:, 8:]), f"{name}: segment 1 must reach segment 3"


def test_without_memory_updates_mac_segments_never_see_each_other():
    # With a vanishing learning rate and no forgetting every segment reads W_0, and without the
    # short convolutions (causal over the whole stream) only attention could carry a token into a
    # later segment; it must not.
    options = {"chunk_size": 2, "segment_len": 4, "theta_max": 1e-30, "weight_decay": False, "conv_size": 0}
    cfg = model_config(
        ("titans_mac",),
        {"titans_mac": options},
        mlp=False,
    )
    model = build_model(cfg, seed=3)
    x = tokens()
    base, out = forward(model, x), forward(model, x.at[:, 1].set((x[:, 1] + 7) % VOCAB))
    np.testing.assert_array_equal(np.asarray(out[:, 4:]), np.asarray(base[:, 4:]))
    assert not np.allclose(out[:, 1:4], base[:, 1:4])


def test_mac_memory_learns_from_the_attention_sublayer_with_its_residual():
    # y = x + W_a·Attn(S̃): with W_a zeroed the memory sees exactly the block's input, so its
    # state after a whole segment is the memory's own prefill of x.
    mac = build_model(CASES["mac"], seed=4).blocks[0].mixer
    x = jax.random.normal(jax.random.key(5), (2, 8, CASES["mac"].d_model))
    _, want = mac.memory.prefill(x, mac.memory.init_state(2))
    _, moved = mac.prefill(x, mac.init_state(2, 8))
    mac.attention_proj.kernel[...] = jnp.zeros_like(mac.attention_proj.kernel[...])
    _, got = mac.prefill(x, mac.init_state(2, 8))
    for g, w in zip(jax.tree.leaves(got.memory), jax.tree.leaves(want)):
        assert_close(g, w, tol=1e-5, name="memory state with W_a = 0")
    moved_weights, want_weights = jax.tree.leaves(moved.memory)[0], jax.tree.leaves(want)[0]
    assert not np.allclose(moved_weights, want_weights), "W_a·Attn must reach the memory"


@pytest.mark.parametrize(
    "mixer, options, field",
    [
        ("titans_lmm", {"depth": 5}, r"model\.mixer_options\.titans_lmm\.depth"),
        ("titans_lmm", {"depth": 0}, r"model\.mixer_options\.titans_lmm\.depth"),
        ("titans_mac", {"chunk_size": 3, "segment_len": 8}, r"model\.mixer_options\.titans_mac\.segment_len"),
        ("titans_mac", {"no_such_option": 1}, r"model\.mixer_options\.titans_mac\.no_such_option"),
        ("titans_mag", {"window": 0}, r"model\.mixer_options\.titans_mag\.window"),
        ("titans_lmm", {"theta_max": 0.0}, r"model\.mixer_options\.titans_lmm\.theta_max"),
        ("titans_lmm", {"activation": "relu"}, r"model\.mixer_options\.titans_lmm\.activation"),
        ("titans_lmm", {"implementation": "cuda"}, r"model\.mixer_options\.titans_lmm\.implementation"),
        ("sliding_window", {"persistent_tokens": -1}, r"model\.mixer_options\.sliding_window\.persistent_tokens"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_field(mixer, options, field):
    with pytest.raises(ConfigError, match=field):
        model_config((mixer,), {mixer: options})


def test_segment_ids_are_refused_with_a_clear_error():
    model = build_model(CASES["lmm"])
    ids = jnp.zeros((2, LENGTH), jnp.int32)
    with pytest.raises(ValueError, match="titans_lmm does not take segment_ids"):
        model(tokens(), segment_ids=ids)


def leaf_bytes(tree) -> int:
    """Bytes of the float arrays of a state (positions and counters aside)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def test_state_bytes_follow_the_memory_formula():
    heads, head_dim, hidden, batch, f32 = 2, 8, 32, 3, 4
    weights = heads * (head_dim * hidden + hidden * head_dim)  # depth 2: D -> 4D -> D
    conv_tails = 3 * 3 * heads * head_dim  # q, k, v: the last conv_size - 1 = 3 inputs
    lmm = build_model(CASES["lmm"]).blocks[0].mixer
    want = batch * (3 * weights + conv_tails) * f32  # weights, momentum, gradient point; conv tails
    assert lmm.state_bytes(batch, 10) == lmm.state_bytes(batch, 100_000) == want
    assert leaf_bytes(lmm.init_state(batch, 100_000)) == want

    mag = build_model(CASES["mag"]).blocks[0].mixer  # window 5, 3 persistent tokens
    per_token = 2 * heads * head_dim * f32
    assert mag.state_bytes(batch, 2) == want + batch * (3 + 2) * per_token
    assert mag.state_bytes(batch, 100_000) == want + batch * (3 + 5) * per_token
    assert leaf_bytes(mag.init_state(batch, 100_000)) == mag.state_bytes(batch, 100_000)

    mac = build_model(CASES["mac"]).blocks[0].mixer  # segments of 4, 2 persistent tokens
    retrieval_tail = 3 * heads * head_dim
    mac_want = want + batch * (weights + retrieval_tail) * f32 + batch * (2 + 2 * 4) * per_token
    assert mac.state_bytes(batch, 1) == mac.state_bytes(batch, 100_000) == mac_want
    assert leaf_bytes(mac.init_state(batch, 100_000)) == mac_want


def test_rates_start_near_the_issues_values():
    lmm = build_model(CASES["lmm"]).blocks[0].mixer
    x = jnp.zeros((1, 16))
    assert float(jax.nn.sigmoid(lmm.memory.momentum_proj(x))[0, 0]) == pytest.approx(0.9)
    assert float(jax.nn.sigmoid(lmm.memory.forget_proj(x))[0, 0]) == pytest.approx(0.01)
    assert TitansLMMOptions().theta_max * 0.5 == pytest.approx(float(lmm.memory.theta_max * jax.nn.sigmoid(0.0)))


def mac_tiny_model_config() -> ModelConfig:
    """The titans-mac-tiny model, narrowed, with segments short enough to cross in a test."""
    model = configs.get_preset("titans-mac-tiny").model
    options = {**model.mixer_options["titans_mac"], "segment_len": 4, "chunk_size": 2}
    return model.replace(d_model=32, n_heads=2, n_layers=1, mlp_dim=64, mixer_options={"titans_mac": options})


def test_titans_mac_greedy_generation_is_the_argmax_of_parallel_logits_step_by_step():
    model = build_model(mac_tiny_model_config(), seed=2)
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, 256)
    new = model.generate(prompt, 6)
    parallel = forward(model, jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(parallel[:, 4:-1], axis=-1)), np.asarray(new))


def test_titans_mac_tiny_preset_trains_and_resumes(tmp_path):
    preset = configs.get_preset("titans-mac-tiny")
    cfg = preset.replace(
        model=mac_tiny_model_config(),
        data=DataConfig(source="text", seq_len=8, batch_size=2, eval_batches=1, prefetch=0),
        mesh=MeshConfig(data=1),
        checkpoint=CheckpointConfig(every_steps=2, keep=2, async_save=False),
        logging=LoggingConfig(log_every=1, eval_every=0, progress_bar=False, tensorboard=False),
        steps=2,
    )
    first = loop.train(cfg, tmp_path, devices=jax.local_devices()[:1])
    assert sorted(first.losses) == [1, 2] and all(np.isfinite(list(first.losses.values())))
    resumed = loop.train(cfg.replace(steps=3), tmp_path, resume=True, devices=jax.local_devices()[:1])
    assert sorted(resumed.losses) == [3] and np.isfinite(resumed.losses[3])


@pytest.mark.parametrize(
    "name", ["titans_lmm", "titans_lmm-deep", "titans_mac", "titans_lmm-no-momentum", "titans_lmm-no-decay"]
)
def test_mqar_settings_build_two_block_models(name):
    grid = protocol_mqar.MqarGrid(
        mixers=(name,), d_models=(64,), seq_lens=(64,), kv_pairs=(4,), lrs=(1e-3,),
        mixer_settings=configs.mqar.MIXER_SETTINGS,
    )
    model = protocol_mqar.train_config(grid, protocol_mqar.grid_points(grid)[0], 1e-3).model
    mixer = name.split("-")[0]
    assert model.layers == ("base_conv", mixer) and model.n_heads == 1
    options = model.mixer_options[mixer]
    assert options.get("momentum", True) == (name != "titans_lmm-no-momentum")
    assert options.get("weight_decay", True) == (name != "titans_lmm-no-decay")
    assert options["depth"] == (2 if name == "titans_lmm-deep" else 1)


@pytest.mark.parametrize("variant", ["lmm", "mag", "mac", "mal"])
def test_paper_presets_have_the_papers_sizes(variant):
    small, large = (configs.get_preset(f"titans-{variant}-{size}") for size in ("170m", "340m"))
    assert (small.model.d_model, small.model.n_layers, large.model.d_model, large.model.n_layers) == (768, 12, 1024, 24)
    for cfg in (small, large):
        assert (cfg.data.seq_len, cfg.model.vocab_size, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
            4096, 32_000, 4e-4, 0.1
        )
    assert configs.get_preset(f"titans-{variant}-tiny").name == f"titans-{variant}-tiny"
