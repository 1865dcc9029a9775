"""Pallas kernels under a device mesh run per shard (shard_map), with the same numbers
as without a mesh; the partition helper picks only axes that divide the dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from kernels._sharding import per_shard
from kernels.testing import assert_close


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _recording_kernel(seen):
    def kernel(x, state, *, scale, ids=None):
        seen.append((x.shape, state.shape, None if ids is None else ids.shape))
        return x * scale + state.sum(), state * 2

    return per_shard(kernel, arg_layouts=("BTH", "BH"), kwarg_layouts={"ids": "BT"}, out_layouts=("BTH", "BH"))


def test_per_shard_splits_batch_and_heads_over_the_partition(mesh):
    seen = []
    kernel = _recording_kernel(seen)
    x, state, ids = jnp.ones((8, 3, 4, 5)), jnp.ones((8, 4, 6)), jnp.zeros((8, 3), jnp.int32)
    with jax.set_mesh(mesh), kernels.kernel_partition(batch=("data", "fsdp"), heads=("tensor",)):
        y, new_state = jax.jit(lambda x, s, i: kernel(x, s, scale=3.0, ids=i))(x, state, ids)
    assert seen == [((2, 3, 2, 5), (2, 2, 6), (2, 3))]
    # Each shard sums only its own [2, 2, 6] slice of the state: 24 ones.
    np.testing.assert_allclose(y, 3.0 + 24.0)
    np.testing.assert_allclose(new_state, 2.0)


def test_per_shard_leaves_out_axes_that_do_not_divide(mesh):
    seen = []
    kernel = _recording_kernel(seen)
    x, state = jnp.ones((6, 3, 3, 5)), jnp.ones((6, 3, 6))  # 6 rows: data (2) divides, data*fsdp (4) does not
    with jax.set_mesh(mesh), kernels.kernel_partition(batch=("data", "fsdp"), heads=("tensor",)):
        jax.jit(lambda x, s: kernel(x, s, scale=1.0))(x, state)
    assert seen == [((3, 3, 3, 5), (3, 3, 6), None)]


def test_without_a_partition_the_batch_splits_over_every_mesh_axis(mesh):
    seen = []
    kernel = _recording_kernel(seen)
    with jax.set_mesh(mesh):
        jax.jit(lambda x, s: kernel(x, s, scale=1.0))(jnp.ones((8, 2, 2, 1)), jnp.ones((8, 2, 1)))
    assert seen == [((1, 2, 2, 1), (1, 2, 1), None)]


def test_without_a_mesh_the_kernel_runs_whole():
    seen = []
    _recording_kernel(seen)(jnp.ones((8, 2, 2, 1)), jnp.ones((8, 2, 1)), scale=1.0)
    assert seen == [((8, 2, 2, 1), (8, 2, 1), None)]


def test_partition_rejects_an_axis_for_both_dims():
    with pytest.raises(ValueError, match="both batch and heads"):
        with kernels.kernel_partition(batch=("data", "tensor"), heads=("tensor",)):
            pass


def _ops(seed):
    """name -> (function of float arrays, its inputs): every op's Pallas form, tiny shapes."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    B, T, H, D = 4, 32, 2, 16
    q, k, v = normal(B, T, H, D), normal(B, T, H, D), normal(B, T, H, D)
    unit_k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (B, T, H)), jnp.float32)
    log_decay = jnp.asarray(rng.uniform(-0.3, 0.0, (B, T, H)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([[0] * 20 + [1] * 12], B, axis=0), jnp.int32)

    def attention(q, k, v):
        return kernels.attention(q, k, v, window=8, prefix=2, segment_ids=segment_ids, implementation="pallas")

    def linear_attention(q, k, v, log_decay):
        y, state = kernels.linear_attention(
            q, k, v, log_decay=log_decay, normalize=False, chunk_size=16, return_final_state=True,
            implementation="pallas",
        )
        return y, state.S

    def delta_rule(q, k, v, beta, log_decay):
        return kernels.delta_rule(
            q, k, v, beta, log_decay=log_decay, chunk_size=16, return_final_state=True, implementation="pallas"
        )

    def attention_decode(q, k, v):
        cache = kernels.init_kv_cache(B, T, H, D)
        _, cache = kernels.attention_decode(q[:, :-1], k[:, :-1], v[:, :-1], cache, implementation="pallas")
        out, _ = kernels.attention_decode(q[:, -1:], k[:, -1:], v[:, -1:], cache, implementation="pallas")
        return out

    def titans_memory(q, k, v, lr, log_decay, w1, w2):
        y, state = kernels.titans_memory(
            q, k / jnp.linalg.norm(k, axis=-1, keepdims=True), v, lr, log_momentum=log_decay,
            log_retain=log_decay / 10, initial_weights=(w1, w2), chunk_size=16, return_final_state=True,
            implementation="pallas",
        )
        return y, state.weights, state.momentum

    lr = jnp.asarray(rng.uniform(0.0, 0.1, (B, T, H)), jnp.float32)
    w1, w2 = normal(H, D, 2 * D) / 4, normal(H, 2 * D, D) / 6
    return {
        "titans_memory": (titans_memory, (q, k, v, lr, log_decay, w1, w2)),
        "attention": (attention, (q, k, v)),
        "attention_decode": (attention_decode, (q, k, v)),
        "linear_attention": (linear_attention, (q, k, v, log_decay)),
        "delta_rule": (delta_rule, (q, unit_k, v, beta, log_decay)),
    }


@pytest.mark.parametrize("op", ["attention", "attention_decode", "linear_attention", "delta_rule", "titans_memory"])
def test_pallas_ops_under_a_mesh_match_the_unsharded_run(mesh, op):
    fn, inputs = _ops(0)[op]
    expected = fn(*inputs)
    batch_split = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), kernels.kernel_partition(batch=("data", "fsdp"), heads=("tensor",)):
        # Batch-major inputs go onto the mesh split; the memory's per-head W_0 stays as it is.
        placed = [jax.device_put(x, batch_split) if x.shape[0] == 4 else x for x in inputs]
        assert "shard_map" in str(jax.make_jaxpr(fn)(*placed))
        got = jax.jit(fn)(*placed)
    for expected_leaf, got_leaf in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert_close(got_leaf, expected_leaf, tol=1e-5, name=op)


def test_gradients_through_a_sharded_kernel_match(mesh):
    fn, inputs = _ops(1)["delta_rule"]
    loss = lambda *args: sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(fn(*args)))
    expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*inputs)
    with jax.set_mesh(mesh), kernels.kernel_partition(batch=("data", "fsdp"), heads=("tensor",)):
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)
    for name, expected_leaf, got_leaf in zip(("dq", "dk", "dv", "dbeta", "dlog_decay"), expected, got):
        assert_close(got_leaf, expected_leaf, tol=1e-5, name=name)
