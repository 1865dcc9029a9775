"""Pallas GPU (Triton) kernels of chunked linear attention: the forward and the two
passes of the backward, with the same interface as pallas_tpu.

The grid is (batch, heads): one program owns a head and walks its chunks in a
lax.fori_loop, the state (S_p, z_p per feature piece) riding in registers as the loop
carry; only the chunk being worked on is loaded. Triton wants power-of-two blocks, at
least 16 wide for tl.dot: head dims are zero-padded here to such a size (exact: the
padded channels are zero features and their state rows stay zero), and chunks must be
powers of two.

  forward                 chunks in order: y, and the final state.
  backward_queries        chunks in order, recomputing the state: dq, the query side of
                          the log-decay gradient, and the normalizer terms.
  backward_keys_values    chunks in reverse order, carrying the gradient of the state:
                          dk, dv, the key side of the log-decay gradient, d initial_state.

The math of one chunk lives in kernel_math, shared with the TPU kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import _backend
from kernels.linear_attention import kernel_math

MIN_BLOCK = 16
_NUM_WARPS = 4
_NUM_STAGES = 2


def chunk_for(seq_len: int, chunk_size: int) -> int:
    """The chunk the kernels use: chunk_size, shrunk for short sequences."""
    if chunk_size < MIN_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"linear_attention (Pallas GPU): chunk_size must be a power of two >= {MIN_BLOCK} "
            f"(Triton block shapes), got {chunk_size}"
        )
    return min(chunk_size, _power_of_two_block(seq_len))


def forward(q, k, v, b, state, *, cfg: kernel_math.Config):
    """q, k [B,H,T,Dk], v [B,H,T,Dv], b chunk-cumulative log-decay (None, [B,H,T] or
    [B,H,T,Dk]), state ((S_p [B,H,F_p,Dv], z_p [B,H,F_p] or None) per piece)
    -> (y [B,H,T,Dv] in v's dtype, final state in the same layout)."""
    padding = _Padding(q.shape[-1], v.shape[-1], cfg)
    q, k, v, b = padding.keys(q), padding.keys(k), padding.values(v), padding.decay(b)
    program = _Program(q, v, cfg)
    operands = program.common_operands(q, k, v, b)
    program.add_state(operands, "initial", padding.state(state))
    outputs = kernel_math.NamedBlocks()
    outputs.add("y", jax.ShapeDtypeStruct(v.shape, v.dtype), program.token_spec(v.shape[-1]))
    program.add_state_outputs(outputs, "final")
    results = program.call(_forward_kernel, operands, outputs)
    final_state = padding.unpad_state(program.collect_state(results, "final"))
    return padding.unpad_values(results["y"]), final_state


def backward_queries(q, k, v, b, state, do, *, cfg: kernel_math.Config):
    """-> (dq [B,H,T,Dk] f32, query side of d loss / d cumulative decay [B,H,T] (per head,
    else None), 1 / (normalizer + eps) and d loss / d normalizer [B,H,T] (normalize,
    else None))."""
    padding = _Padding(q.shape[-1], v.shape[-1], cfg)
    q, k, v, b, do = padding.keys(q), padding.keys(k), padding.values(v), padding.decay(b), padding.values(do)
    program = _Program(q, v, cfg)
    operands = program.common_operands(q, k, v, b)
    program.add_state(operands, "initial", padding.state(state))
    operands.add("do", do, program.token_spec(do.shape[-1]))
    outputs = kernel_math.NamedBlocks()
    outputs.add("dq", jax.ShapeDtypeStruct(q.shape, jnp.float32), program.token_spec(q.shape[-1]))
    per_token = jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)
    if cfg.decay == "head":
        outputs.add("d_cumulative_q", per_token, program.token_spec(1))
    if cfg.normalize:
        outputs.add("inv_normalizer", per_token, program.token_spec(1))
        outputs.add("d_normalizer", per_token, program.token_spec(1))
    results = program.call(_query_gradients_kernel, operands, outputs)
    per_token_results = tuple(
        results[name][..., 0] if name in results else None
        for name in ("d_cumulative_q", "inv_normalizer", "d_normalizer")
    )
    return (padding.unpad_keys(results["dq"]), *per_token_results)


def backward_keys_values(q, k, v, b, do, inv_normalizer, d_normalizer, d_final_state, *, cfg: kernel_math.Config):
    """-> (dk [B,H,T,Dk] f32, dv [B,H,T,Dv] f32, key side of d loss / d cumulative decay
    [B,H,T] (per head, else None), d initial state in the state layout)."""
    padding = _Padding(q.shape[-1], v.shape[-1], cfg)
    q, k, v, b, do = padding.keys(q), padding.keys(k), padding.values(v), padding.decay(b), padding.values(do)
    program = _Program(q, v, cfg)
    operands = program.common_operands(q, k, v, b)
    operands.add("do", do, program.token_spec(do.shape[-1]))
    if cfg.normalize:
        operands.add("inv_normalizer", inv_normalizer[..., None], program.token_spec(1))
        operands.add("d_normalizer", d_normalizer[..., None], program.token_spec(1))
        operands.add("d_normalizer_row", d_normalizer, program.sequence_spec())
    program.add_state(operands, "d_final", padding.state(d_final_state))
    outputs = kernel_math.NamedBlocks()
    outputs.add("dk", jax.ShapeDtypeStruct(k.shape, jnp.float32), program.token_spec(k.shape[-1]))
    outputs.add("dv", jax.ShapeDtypeStruct(v.shape, jnp.float32), program.token_spec(v.shape[-1]))
    if cfg.decay == "head":
        outputs.add(
            "d_cumulative_k", jax.ShapeDtypeStruct((*k.shape[:3], 1), jnp.float32), program.token_spec(1)
        )
    program.add_state_outputs(outputs, "d_initial")
    results = program.call(_key_value_gradients_kernel, operands, outputs)
    d_cumulative_k = results["d_cumulative_k"][..., 0] if "d_cumulative_k" in results else None
    d_initial_state = padding.unpad_state(program.collect_state(results, "d_initial"))
    return padding.unpad_keys(results["dk"]), padding.unpad_values(results["dv"]), d_cumulative_k, d_initial_state


# --- kernels --------------------------------------------------------------------


def _forward_kernel(refs, cfg, num_chunks):
    def chunk_step(chunk_index, state):
        tokens = pl.ds(chunk_index * cfg.chunk, cfg.chunk)
        y, state = kernel_math.forward_chunk(
            cfg, *_load(refs, tokens, "q", "k", "v"), _load_decay(refs, cfg, tokens, chunk_index), state,
            _expansion(refs, cfg), kernel_math.key_is_token(cfg, chunk_index),
        )
        refs["y"][tokens, :] = y.astype(refs["y"].dtype)
        return state

    state = lax.fori_loop(0, num_chunks, chunk_step, _load_state(refs, "initial", cfg))
    _store_state(refs, "final", state)


def _query_gradients_kernel(refs, cfg, num_chunks):
    def chunk_step(chunk_index, state):
        tokens = pl.ds(chunk_index * cfg.chunk, cfg.chunk)
        gradients, state = kernel_math.query_gradients_chunk(
            cfg, *_load(refs, tokens, "q", "k", "v", "do"), _load_decay(refs, cfg, tokens, chunk_index), state,
            _expansion(refs, cfg), kernel_math.key_is_token(cfg, chunk_index),
        )
        refs["dq"][tokens, :] = gradients.dq
        for name in ("d_cumulative_q", "inv_normalizer", "d_normalizer"):
            if name in refs:
                refs[name][tokens, :] = getattr(gradients, name)
        return state

    lax.fori_loop(0, num_chunks, chunk_step, _load_state(refs, "initial", cfg))


def _key_value_gradients_kernel(refs, cfg, num_chunks):
    def chunk_step(step, d_state):
        chunk_index = num_chunks - 1 - step
        tokens = pl.ds(chunk_index * cfg.chunk, cfg.chunk)
        if cfg.normalize:
            inv_normalizer, d_normalizer = _load(refs, tokens, "inv_normalizer", "d_normalizer")
            d_normalizer_row = refs["d_normalizer_row"][tokens][None, :]
        else:
            inv_normalizer = d_normalizer = d_normalizer_row = None
        gradients, d_state = kernel_math.key_value_gradients_chunk(
            cfg, *_load(refs, tokens, "q", "k", "v", "do"), _load_decay(refs, cfg, tokens, chunk_index),
            inv_normalizer, d_normalizer_row, d_normalizer, d_state, _expansion(refs, cfg),
        )
        refs["dk"][tokens, :] = gradients.dk
        refs["dv"][tokens, :] = gradients.dv
        if "d_cumulative_k" in refs:
            refs["d_cumulative_k"][tokens, :] = gradients.d_cumulative_k
        return d_state

    d_state = lax.fori_loop(0, num_chunks, chunk_step, _load_state(refs, "d_final", cfg))
    _store_state(refs, "d_initial", d_state)


def _load(refs, tokens, *names):
    return tuple(refs[name][tokens, :].astype(jnp.float32) for name in names)


def _load_decay(refs, cfg, tokens, chunk_index):
    if cfg.decay is None:
        return None
    if cfg.decay == "head":
        b = refs["b"][tokens]
        return kernel_math.Decay(b[:, None], b[None, :], None)
    return kernel_math.Decay(refs["b"][tokens, :], None, refs["b_last"][chunk_index, :][:, None])


def _expansion(refs, cfg):
    return (refs["expand_first"][...], refs["expand_second"][...]) if cfg.has_expansion else None


def _load_state(refs, prefix, cfg):
    return tuple(
        (refs[f"{prefix}_S{index}"][...], refs[f"{prefix}_z{index}"][...] if cfg.normalize else None)
        for index in range(len(cfg.pieces))
    )


def _store_state(refs, prefix, state):
    for index, (S_p, z_p) in enumerate(state):
        refs[f"{prefix}_S{index}"][...] = S_p
        if z_p is not None:
            refs[f"{prefix}_z{index}"][...] = z_p


# --- padding to Triton's power-of-two blocks ----------------------------------------


def _power_of_two_block(size: int) -> int:
    return max(MIN_BLOCK, 1 << (size - 1).bit_length())


class _Padding:
    """Zero-pads head dims to power-of-two blocks, and maps states and results back."""

    def __init__(self, key_dim: int, value_dim: int, cfg: kernel_math.Config):
        self.key_dim, self.value_dim = key_dim, value_dim
        self.padded_key_dim = _power_of_two_block(key_dim)
        self.padded_value_dim = _power_of_two_block(value_dim)
        self.cfg = cfg

    def keys(self, x):
        return _pad_axis(x, -1, self.padded_key_dim)

    def values(self, x):
        return _pad_axis(x, -1, self.padded_value_dim)

    def decay(self, b):
        return self.keys(b) if self.cfg.decay == "channel" else b

    def unpad_keys(self, x):
        return x[..., : self.key_dim]

    def unpad_values(self, x):
        return x[..., : self.value_dim]

    def state(self, state):
        return self._resize_state(state, self.key_dim, self.padded_key_dim, self.values)

    def unpad_state(self, state):
        return self._resize_state(state, self.padded_key_dim, self.key_dim, self.unpad_values)

    def _resize_state(self, state, from_dim, to_dim, resize_values):
        return tuple(
            (
                resize_values(_resize_features(piece, S_p, from_dim, to_dim)),
                None if z_p is None else _resize_features(piece, z_p, from_dim, to_dim),
            )
            for piece, (S_p, z_p) in zip(self.cfg.pieces, state)
        )


def _resize_features(piece, x, from_dim, to_dim):
    """Zero-pad or cut the feature axis (2) of one piece's S_p or z_p from head dim
    from_dim to to_dim; the quadratic piece as a d x d grid, so feature a*d+b stays (a, b)."""
    if piece.kind == "constant":
        return x
    if piece.kind == "linear":
        return _resize_axis(x, 2, to_dim)
    grid = x.reshape(*x.shape[:2], from_dim, from_dim, *x.shape[3:])
    grid = _resize_axis(_resize_axis(grid, 2, to_dim), 3, to_dim)
    return grid.reshape(*x.shape[:2], to_dim * to_dim, *x.shape[3:])


def _resize_axis(x, axis, size):
    """Zero-pad or cut one axis to `size`."""
    if size <= x.shape[axis]:
        return lax.slice_in_dim(x, 0, size, axis=axis)
    return _pad_axis(x, axis, size)


def _pad_axis(x, axis, size):
    axis = axis % x.ndim
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


# --- operands, block specs and the pallas_call -------------------------------------


class _Program:
    """Block specs of a (batch, heads) grid: each program sees its head's whole sequence
    and loads one chunk at a time."""

    def __init__(self, q, v, cfg: kernel_math.Config):
        self.batch, self.heads, self.padded_len, self.key_dim = q.shape
        self.value_dim = v.shape[-1]
        self.cfg = cfg
        self.num_chunks = self.padded_len // cfg.chunk

    def token_spec(self, width):
        """A head's [T, width] slab of a [B, H, T, width] array."""
        return pl.BlockSpec((None, None, self.padded_len, width), lambda b, h: (b, h, 0, 0))

    def sequence_spec(self):
        """A head's [T] row of a [B, H, T] array."""
        return pl.BlockSpec((None, None, self.padded_len), lambda b, h: (b, h, 0))

    def head_spec(self, shape):
        return pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))

    def common_operands(self, q, k, v, b):
        cfg = self.cfg
        operands = kernel_math.NamedBlocks()
        operands.add("q", q, self.token_spec(self.key_dim))
        operands.add("k", k, self.token_spec(self.key_dim))
        operands.add("v", v, self.token_spec(self.value_dim))
        if cfg.decay == "head":
            operands.add("b", b, self.sequence_spec())
        elif cfg.decay == "channel":
            operands.add("b", b, self.token_spec(self.key_dim))
            chunks = b.reshape(self.batch, self.heads, self.num_chunks, cfg.chunk, self.key_dim)
            operands.add("b_last", chunks[:, :, :, -1, :], self.head_spec((self.num_chunks, self.key_dim)))
        if cfg.has_expansion:
            for name, matrix in zip(("expand_first", "expand_second"), kernel_math.selection_matrices(self.key_dim)):
                operands.add(name, matrix, pl.BlockSpec(matrix.shape, lambda b, h: (0, 0)))
        return operands

    def _piece_sizes(self):
        """Features of each state piece at the padded head dim."""
        sizes = {"constant": 1, "linear": self.key_dim, "quadratic": self.key_dim * self.key_dim}
        return [sizes[piece.kind] for piece in self.cfg.pieces]

    def add_state(self, operands, prefix, state):
        for index, (S_p, z_p) in enumerate(state):
            operands.add(f"{prefix}_S{index}", S_p, self.head_spec(S_p.shape[2:]))
            if z_p is not None:
                operands.add(f"{prefix}_z{index}", z_p[:, :, None, :], self.head_spec((1, z_p.shape[-1])))

    def add_state_outputs(self, outputs, prefix):
        for index, features in enumerate(self._piece_sizes()):
            S_shape = (self.batch, self.heads, features, self.value_dim)
            outputs.add(f"{prefix}_S{index}", jax.ShapeDtypeStruct(S_shape, jnp.float32), self.head_spec(S_shape[2:]))
            if self.cfg.normalize:
                z_shape = (self.batch, self.heads, 1, features)
                outputs.add(
                    f"{prefix}_z{index}", jax.ShapeDtypeStruct(z_shape, jnp.float32), self.head_spec(z_shape[2:])
                )

    def collect_state(self, results, prefix):
        return tuple(
            (results[f"{prefix}_S{index}"], results[f"{prefix}_z{index}"][:, :, 0, :] if self.cfg.normalize else None)
            for index in range(len(self._piece_sizes()))
        )

    def call(self, kernel, operands: kernel_math.NamedBlocks, outputs: kernel_math.NamedBlocks):
        """Run kernel(refs, cfg, num_chunks) over the grid; refs maps names to refs."""

        def named_kernel(*refs):
            kernel(dict(zip(operands.names + outputs.names, refs)), self.cfg, self.num_chunks)

        results = pl.pallas_call(
            named_kernel,
            out_shape=outputs.items,
            grid=(self.batch, self.heads),
            in_specs=operands.specs,
            out_specs=outputs.specs,
            compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES),
            interpret=_backend.interpret_mode(),
            name=f"linear_attention_{kernel.__name__.strip('_')}",
        )(*operands.items)
        return dict(zip(outputs.names, results))
