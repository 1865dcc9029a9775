"""Pallas TPU (Mosaic) kernels of chunked linear attention: the forward and the two
passes of the backward.

Arrays come in [B, H, T_pad, D] layout, so a chunk is a legal (C, D) block for any D
(full last dim; C a multiple of 16 sublanes, which also suits bfloat16). The grid is
(batch, heads, chunks) with the chunk axis "arbitrary": it runs in order and carries
the state (S_p, z_p per feature piece) in VMEM scratch, so the taylor2 state of
(1 + d + d^2) x Dv per head stays on chip and its features never reach HBM.

  forward                 chunks in order: y, and the final state.
  backward_queries        chunks in order, recomputing the state: dq, the query side of
                          the log-decay gradient, and the normalizer terms.
  backward_keys_values    chunks in reverse order, carrying the gradient of the state:
                          dk, dv, the key side of the log-decay gradient, d initial_state.

No per-chunk state is stored: both backward passes recompute what they need.
The math of one chunk lives in kernel_math, shared with the GPU kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _backend
from kernels.linear_attention import kernel_math

# Chunks are whole (16, 128) bfloat16 tiles along the sequence (8 would do for float32).
CHUNK_MULTIPLE = 16
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def chunk_for(seq_len: int, chunk_size: int) -> int:
    """The chunk the kernels use: chunk_size, shrunk for short sequences."""
    if chunk_size % CHUNK_MULTIPLE:
        raise ValueError(
            f"linear_attention (Pallas TPU): chunk_size must be a multiple of {CHUNK_MULTIPLE} "
            f"(TPU sublane tiling), got {chunk_size}"
        )
    return min(chunk_size, -(-seq_len // CHUNK_MULTIPLE) * CHUNK_MULTIPLE)


def forward(q, k, v, b, state, *, cfg: kernel_math.Config):
    """q, k [B,H,T,Dk], v [B,H,T,Dv], b chunk-cumulative log-decay (None, [B,H,T] or
    [B,H,T,Dk]), state ((S_p [B,H,F_p,Dv], z_p [B,H,F_p] or None) per piece)
    -> (y [B,H,T,Dv] in v's dtype, final state in the same layout)."""
    grid = _Grid(q, v, cfg, reverse=False)
    operands = grid.common_operands(q, k, v, b)
    grid.add_state(operands, "initial", state)
    outputs = kernel_math.NamedBlocks()
    outputs.add("y", jax.ShapeDtypeStruct(v.shape, v.dtype), grid.token_spec(v.shape[-1]))
    grid.add_state_outputs(outputs, "final", state)
    results = grid.call(_forward_kernel, operands, outputs)
    return results["y"], grid.collect_state(results, "final", state)


def backward_queries(q, k, v, b, state, do, *, cfg: kernel_math.Config):
    """-> (dq [B,H,T,Dk] f32, query side of d loss / d cumulative decay [B,H,T] (per head,
    else None), 1 / (normalizer + eps) and d loss / d normalizer [B,H,T] (normalize,
    else None))."""
    grid = _Grid(q, v, cfg, reverse=False)
    operands = grid.common_operands(q, k, v, b)
    grid.add_state(operands, "initial", state)
    operands.add("do", do, grid.token_spec(do.shape[-1]))
    outputs = kernel_math.NamedBlocks()
    outputs.add("dq", jax.ShapeDtypeStruct(q.shape, jnp.float32), grid.token_spec(q.shape[-1]))
    per_token = jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)
    if cfg.decay == "head":
        outputs.add("d_cumulative_q", per_token, grid.token_spec(1))
    if cfg.normalize:
        outputs.add("inv_normalizer", per_token, grid.token_spec(1))
        outputs.add("d_normalizer", per_token, grid.token_spec(1))
    results = grid.call(_query_gradients_kernel, operands, outputs)
    per_token_results = tuple(
        results[name][..., 0] if name in results else None
        for name in ("d_cumulative_q", "inv_normalizer", "d_normalizer")
    )
    return (results["dq"], *per_token_results)


def backward_keys_values(q, k, v, b, do, inv_normalizer, d_normalizer, d_final_state, *, cfg: kernel_math.Config):
    """-> (dk [B,H,T,Dk] f32, dv [B,H,T,Dv] f32, key side of d loss / d cumulative decay
    [B,H,T] (per head, else None), d initial state in the state layout)."""
    grid = _Grid(q, v, cfg, reverse=True)
    operands = grid.common_operands(q, k, v, b)
    operands.add("do", do, grid.token_spec(do.shape[-1]))
    if cfg.normalize:
        operands.add("inv_normalizer", inv_normalizer[..., None], grid.token_spec(1))
        operands.add("d_normalizer", d_normalizer[..., None], grid.token_spec(1))
        operands.add("d_normalizer_row", grid.as_chunk_rows(d_normalizer), grid.chunk_row_spec())
    grid.add_state(operands, "d_final", d_final_state)
    outputs = kernel_math.NamedBlocks()
    outputs.add("dk", jax.ShapeDtypeStruct(k.shape, jnp.float32), grid.token_spec(k.shape[-1]))
    outputs.add("dv", jax.ShapeDtypeStruct(v.shape, jnp.float32), grid.token_spec(v.shape[-1]))
    if cfg.decay == "head":
        outputs.add("d_cumulative_k", jax.ShapeDtypeStruct((*k.shape[:3], 1), jnp.float32), grid.token_spec(1))
    grid.add_state_outputs(outputs, "d_initial", d_final_state)
    results = grid.call(_key_value_gradients_kernel, operands, outputs)
    d_cumulative_k = results["d_cumulative_k"][..., 0] if "d_cumulative_k" in results else None
    return results["dk"], results["dv"], d_cumulative_k, grid.collect_state(results, "d_initial", d_final_state)


# --- kernels --------------------------------------------------------------------


def _forward_kernel(refs, cfg, num_chunks):
    chunk_index = pl.program_id(2)
    state = _carried_state(refs, "initial", chunk_index)
    y, state = kernel_math.forward_chunk(
        cfg, *_load(refs, "q", "k", "v"), _load_decay(refs, cfg), state, _expansion(refs, cfg),
        kernel_math.key_is_token(cfg, chunk_index),
    )
    refs["y"][...] = y.astype(refs["y"].dtype)
    _store_carried_state(refs, state)
    _write_state_at_last_chunk(refs, "final", state, chunk_index, num_chunks)


def _query_gradients_kernel(refs, cfg, num_chunks):
    chunk_index = pl.program_id(2)
    state = _carried_state(refs, "initial", chunk_index)
    gradients, state = kernel_math.query_gradients_chunk(
        cfg, *_load(refs, "q", "k", "v", "do"), _load_decay(refs, cfg), state, _expansion(refs, cfg),
        kernel_math.key_is_token(cfg, chunk_index),
    )
    refs["dq"][...] = gradients.dq
    for name in ("d_cumulative_q", "inv_normalizer", "d_normalizer"):
        if name in refs:
            refs[name][...] = getattr(gradients, name)
    _store_carried_state(refs, state)


def _key_value_gradients_kernel(refs, cfg, num_chunks):
    step = pl.program_id(2)  # chunks run last to first
    d_state = _carried_state(refs, "d_final", step)
    normalizer_terms = (
        _load(refs, "inv_normalizer", "d_normalizer_row", "d_normalizer") if cfg.normalize else (None, None, None)
    )
    gradients, d_state = kernel_math.key_value_gradients_chunk(
        cfg, *_load(refs, "q", "k", "v", "do"), _load_decay(refs, cfg), *normalizer_terms, d_state,
        _expansion(refs, cfg),
    )
    refs["dk"][...] = gradients.dk
    refs["dv"][...] = gradients.dv
    if "d_cumulative_k" in refs:
        refs["d_cumulative_k"][...] = gradients.d_cumulative_k
    _store_carried_state(refs, d_state)
    _write_state_at_last_chunk(refs, "d_initial", d_state, step, num_chunks)


def _load(refs, *names):
    return tuple(refs[name][...].astype(jnp.float32) for name in names)


def _load_decay(refs, cfg):
    if cfg.decay is None:
        return None
    if cfg.decay == "head":
        return kernel_math.Decay(refs["b"][...], refs["b_row"][...], None)
    return kernel_math.Decay(refs["b"][...], None, refs["last_col"][...])


def _expansion(refs, cfg):
    return (refs["expand_first"][...], refs["expand_second"][...]) if cfg.has_expansion else None


def _carried_state(refs, prefix, step):
    """The state carried into this chunk: the `prefix` input at the first step, else scratch."""
    pieces = refs["scratch"]

    @pl.when(step == 0)
    def _():
        for index, (S_scratch, z_scratch) in enumerate(pieces):
            S_scratch[...] = refs[f"{prefix}_S{index}"][...]
            if z_scratch is not None:
                z_scratch[...] = refs[f"{prefix}_z{index}"][...]

    return tuple(
        (S_scratch[...], None if z_scratch is None else z_scratch[...]) for S_scratch, z_scratch in pieces
    )


def _store_carried_state(refs, state):
    for (S_scratch, z_scratch), (S_p, z_p) in zip(refs["scratch"], state):
        S_scratch[...] = S_p
        if z_scratch is not None:
            z_scratch[...] = z_p


def _write_state_at_last_chunk(refs, prefix, state, step, num_chunks):
    @pl.when(step == num_chunks - 1)
    def _():
        for index, (S_p, z_p) in enumerate(state):
            refs[f"{prefix}_S{index}"][...] = S_p
            if z_p is not None:
                refs[f"{prefix}_z{index}"][...] = z_p


# --- operands, block specs and the pallas_call -------------------------------------


class _Grid:
    """Block specs over the (batch, heads, chunks) grid, chunks in order or reversed."""

    def __init__(self, q, v, cfg: kernel_math.Config, *, reverse: bool):
        self.batch, self.heads, padded_len, self.key_dim = q.shape
        self.value_dim = v.shape[-1]
        self.cfg = cfg
        self.num_chunks = padded_len // cfg.chunk
        self.reverse = reverse

    def chunk_of(self, step):
        return self.num_chunks - 1 - step if self.reverse else step

    def token_spec(self, width):
        """One chunk of a [B, H, T, width] array."""
        return pl.BlockSpec((None, None, self.cfg.chunk, width), lambda b, h, n: (b, h, self.chunk_of(n), 0))

    def chunk_row_spec(self):
        """One chunk of a [B, H, N, 1, C] array: a per-token value as a (1, C) row."""
        return pl.BlockSpec((None, None, None, 1, self.cfg.chunk), lambda b, h, n: (b, h, self.chunk_of(n), 0, 0))

    def as_chunk_rows(self, per_token):
        """[B, H, T] -> [B, H, N, 1, C]."""
        return per_token.reshape(self.batch, self.heads, self.num_chunks, 1, self.cfg.chunk)

    def head_spec(self, shape):
        """A per-(batch, head) array [B, H, *shape], the same block for every chunk."""
        return pl.BlockSpec((None, None, *shape), lambda b, h, n: (b, h) + (0,) * len(shape))

    def common_operands(self, q, k, v, b):
        cfg = self.cfg
        operands = kernel_math.NamedBlocks()
        operands.add("q", q, self.token_spec(q.shape[-1]))
        operands.add("k", k, self.token_spec(k.shape[-1]))
        operands.add("v", v, self.token_spec(v.shape[-1]))
        if cfg.decay == "head":
            operands.add("b", b[..., None], self.token_spec(1))
            operands.add("b_row", self.as_chunk_rows(b), self.chunk_row_spec())
        elif cfg.decay == "channel":
            operands.add("b", b, self.token_spec(self.key_dim))
            last = b.reshape(self.batch, self.heads, self.num_chunks, cfg.chunk, self.key_dim)[:, :, :, -1, :, None]
            operands.add(
                "last_col",
                last,
                pl.BlockSpec((None, None, None, self.key_dim, 1), lambda b, h, n: (b, h, self.chunk_of(n), 0, 0)),
            )
        if cfg.has_expansion:
            for name, matrix in zip(("expand_first", "expand_second"), kernel_math.selection_matrices(self.key_dim)):
                operands.add(name, matrix, pl.BlockSpec(matrix.shape, lambda b, h, n: (0, 0)))
        return operands

    def add_state(self, operands, prefix, state):
        for index, (S_p, z_p) in enumerate(state):
            operands.add(f"{prefix}_S{index}", S_p, self.head_spec(S_p.shape[2:]))
            if z_p is not None:
                operands.add(f"{prefix}_z{index}", z_p[:, :, None, :], self.head_spec((1, z_p.shape[-1])))

    def add_state_outputs(self, outputs, prefix, state):
        """Outputs shaped like `state`, written once after the last chunk (z as [B, H, 1, F_p])."""
        for index, (S_p, z_p) in enumerate(state):
            S_shape = jax.ShapeDtypeStruct(S_p.shape, jnp.float32)
            outputs.add(f"{prefix}_S{index}", S_shape, self.head_spec(S_p.shape[2:]))
            if z_p is not None:
                z_shape = (*z_p.shape[:2], 1, z_p.shape[-1])
                outputs.add(
                    f"{prefix}_z{index}", jax.ShapeDtypeStruct(z_shape, jnp.float32), self.head_spec(z_shape[2:])
                )

    def collect_state(self, results, prefix, like):
        return tuple(
            (results[f"{prefix}_S{index}"], None if z_p is None else results[f"{prefix}_z{index}"][:, :, 0, :])
            for index, (_, z_p) in enumerate(like)
        )

    def call(self, kernel, operands: kernel_math.NamedBlocks, outputs: kernel_math.NamedBlocks):
        """Run kernel(refs, cfg, num_chunks) over the grid; refs maps names to refs and
        "scratch" to the VMEM state carried across chunks. Returns outputs by name."""
        scratch_shapes, scratch_layout = [], []
        for piece in self.cfg.pieces:
            scratch_shapes.append(pltpu.VMEM((piece.size, self.value_dim), jnp.float32))
            if self.cfg.normalize:
                scratch_shapes.append(pltpu.VMEM((1, piece.size), jnp.float32))
            scratch_layout.append(self.cfg.normalize)
        num_inputs, num_outputs = len(operands.names), len(outputs.names)

        def named_kernel(*refs):
            named = dict(zip(operands.names + outputs.names, refs[: num_inputs + num_outputs]))
            scratch = iter(refs[num_inputs + num_outputs :])
            named["scratch"] = [(next(scratch), next(scratch) if has_z else None) for has_z in scratch_layout]
            kernel(named, self.cfg, self.num_chunks)

        results = pl.pallas_call(
            named_kernel,
            out_shape=outputs.items,
            grid=(self.batch, self.heads, self.num_chunks),
            in_specs=operands.specs,
            out_specs=outputs.specs,
            scratch_shapes=scratch_shapes,
            compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
            interpret=_backend.interpret_mode(),
            name=f"linear_attention_{kernel.__name__.strip('_')}",
        )(*operands.items)
        return dict(zip(outputs.names, results))
