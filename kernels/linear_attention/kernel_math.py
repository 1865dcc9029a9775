"""The per-chunk math of the Pallas linear-attention kernels, shared by TPU and GPU.

Everything here works on values already loaded from refs: one chunk of C tokens of
one (batch, head), as 2-D float32 arrays, so that both Mosaic (TPU) and Triton (GPU)
lower it. Hence the style: no slicing of values (Triton cannot), rows and columns of
[C, C] blocks picked with masked sums, 1-wide arrays as (C, 1) columns and (1, F) rows,
and the feature map's expansion written as matmuls with 0/1 selection matrices.

State layout: a feature map is a sum of pieces (identity: one linear piece of Dk
features; taylor2: constant 1, linear d, quadratic d^2); each piece p holds
S_p [F_p, Dv] and z_p [1, F_p], so the d^2 features only exist inside the kernel.

Decay: b is the within-chunk cumulative log-decay (computed by the caller), per head
as a column b_col (C, 1) and a row b_row (1, C), per channel as b (C, Dk) plus the
chunk's last row as a column last_col (Dk, 1). Every exponent below is a difference of
cumulative sums that is <= 0 (or clamped there where the result is masked out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from kernels.linear_attention.feature_maps import taylor2_scales


class NamedBlocks:
    """A kernel's inputs (arrays) or outputs (ShapeDtypeStructs), each with a name and a
    block spec, in call order; the kernels look their refs up by name."""

    def __init__(self):
        self.names, self.items, self.specs = [], [], []

    def add(self, name, item, spec):
        self.names.append(name)
        self.items.append(item)
        self.specs.append(spec)


class Piece(NamedTuple):
    """One block of features: kind "constant" (1), "linear" (x * scale) or "quadratic"
    (vec(x outer x) * scale, row-major); size is its number of features."""

    kind: str
    size: int
    scale: float


def feature_pieces(feature_map: str | None, key_dim: int) -> tuple[Piece, ...]:
    """The pieces of a feature map, in the order of the public state's feature axis."""
    if feature_map is None:
        return (Piece("linear", key_dim, 1.0),)
    linear_scale, quadratic_scale = taylor2_scales(key_dim)
    return (
        Piece("constant", 1, 1.0),
        Piece("linear", key_dim, linear_scale),
        Piece("quadratic", key_dim * key_dim, quadratic_scale),
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Compile-time settings of one kernel call.

    decay: None, "head" or "channel". key_dim is the true head dim (it sets the
    taylor2 scales even where a kernel pads the arrays). compute_dtype: matmul operand
    dtype, "float32" (exact, Precision.HIGHEST) or "bfloat16" (fast MXU / tensor cores).
    """

    chunk: int
    seq_len: int
    key_dim: int
    feature_map: str | None
    decay: str | None
    normalize: bool
    eps: float
    compute_dtype: str

    @property
    def pieces(self) -> tuple[Piece, ...]:
        return feature_pieces(self.feature_map, self.key_dim)

    @property
    def has_expansion(self) -> bool:
        """Whether the kernel needs the quadratic piece's selection matrices."""
        return self.feature_map == "taylor2"


class Decay(NamedTuple):
    """A chunk's decay as loaded: b is b_col (C, 1) per head or b (C, Dk) per channel;
    b_row (1, C) per head only, last_col (Dk, 1) per channel only."""

    b: jnp.ndarray
    b_row: jnp.ndarray | None
    last_col: jnp.ndarray | None


class DecayFactors(NamedTuple):
    """exp of the decay terms a chunk needs, all with exponents <= 0.

    query: exp(b_i) (C, 1|Dk), scales phi(q) against the incoming state.
    key: exp(b_last - b_j) (C, 1|Dk), scales phi(k) into the outgoing state.
    state_rows: exp(b_last) (1, 1) or (Dk, 1), scales the rows of S.
    normalizer: exp(b_last) (1, 1) or (1, Dk), scales z.
    pair: per head, exp(b_i - b_j) on the causal pairs and 0 elsewhere, [C, C] laid
    out query-major (rows i) or key-major (rows j); None per channel.
    """

    query: jnp.ndarray
    key: jnp.ndarray
    state_rows: jnp.ndarray
    normalizer: jnp.ndarray
    pair: jnp.ndarray | None


def row_ids(size: int):
    return lax.broadcasted_iota(jnp.int32, (size, 1), 0)


def column_ids(size: int):
    return lax.broadcasted_iota(jnp.int32, (1, size), 1)


def causal_mask(chunk: int, *, query_major: bool):
    """[C, C] bool, true on the causal pairs key j <= query i: query-major blocks have
    rows i and columns j, key-major blocks rows j and columns i."""
    rows, columns = row_ids(chunk), column_ids(chunk)
    return rows >= columns if query_major else rows <= columns


def key_is_token(cfg: Config, chunk_index):
    """(C, 1) 1.0 for real tokens, 0.0 for padding; None where padding keys are already
    no-ops (phi(0) = 0 without a feature map; taylor2's phi(0) keeps its constant 1)."""
    if cfg.feature_map is None:
        return None
    positions = chunk_index * cfg.chunk + row_ids(cfg.chunk)
    return (positions < cfg.seq_len).astype(jnp.float32)


def pick_row(x, index):
    """x[index] as a (1, F) row, via a masked sum (dynamic index; Triton has no slicing)."""
    return jnp.sum(jnp.where(row_ids(x.shape[0]) == index, x, 0.0), axis=0, keepdims=True)


def pick_column(x, index):
    """x[:, index] as a (C, 1) column."""
    return jnp.sum(jnp.where(column_ids(x.shape[1]) == index, x, 0.0), axis=1, keepdims=True)


def decay_factors(cfg: Config, decay: Decay | None, *, query_major: bool) -> DecayFactors | None:
    if decay is None:
        return None
    b = decay.b
    chunk = b.shape[0]
    b_last_row = pick_row(b, chunk - 1)
    normalizer = jnp.exp(b_last_row)
    if cfg.decay == "head":
        b_col, b_row = b, decay.b_row
        exponent = b_col - b_row if query_major else b_row - b_col
        pair = jnp.exp(jnp.where(causal_mask(chunk, query_major=query_major), exponent, -jnp.inf))
        state_rows = normalizer
    else:
        pair = None
        state_rows = jnp.exp(decay.last_col)
    return DecayFactors(
        query=jnp.exp(b),
        key=jnp.exp(b_last_row - b),
        state_rows=state_rows,
        normalizer=normalizer,
        pair=pair,
    )


def dot(a, b, cfg: Config, *, transpose_a: bool = False, transpose_b: bool = False):
    """a @ b (optionally a^T, b^T) with float32 accumulation in cfg's compute dtype."""
    dimension_numbers = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    if cfg.compute_dtype == "float32":
        precision = lax.Precision.HIGHEST
    else:
        a, b = a.astype(cfg.compute_dtype), b.astype(cfg.compute_dtype)
        precision = lax.Precision.DEFAULT
    return lax.dot_general(a, b, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)


def selection_dot(x, selection, cfg: Config):
    """x @ selection for a 0/1 matrix: exact, so always at full float32 precision
    (bfloat16 inputs are exact in bfloat16 already)."""
    if cfg.compute_dtype != "float32":
        return dot(x, selection, cfg)
    return lax.dot_general(
        x, selection, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def features(piece: Piece, x, expansion, cfg: Config):
    """phi_p(x): (C, d) -> (C, F_p). expansion = (E_first, E_second), each [d, d^2] with
    (x @ E_first)[:, a*d+b] = x_a and (x @ E_second)[:, a*d+b] = x_b."""
    if piece.kind == "constant":
        return jnp.ones((x.shape[0], 1), jnp.float32)
    if piece.kind == "linear":
        return x * piece.scale
    first, second = expansion
    return selection_dot(x, first, cfg) * selection_dot(x, second, cfg) * piece.scale


def features_backward(piece: Piece, x, d_features, expansion, cfg: Config):
    """The gradient with respect to x of sum(d_features * phi_p(x)); None for the constant piece."""
    if piece.kind == "constant":
        return None
    if piece.kind == "linear":
        return d_features * piece.scale
    first, second = expansion
    # d/dx_a of x_a x_b: x_b from the first factor's column a*d+b, x_a from the second's.
    d_first = d_features * selection_dot(x, second, cfg) * piece.scale
    d_second = d_features * selection_dot(x, first, cfg) * piece.scale
    return dot(d_first, first, cfg, transpose_b=True) + dot(d_second, second, cfg, transpose_b=True)


def read_state(phi, S_p, cfg: Config):
    """phi (C, F_p) @ S_p (F_p, Dv); a broadcast for the 1-feature constant piece."""
    return phi * S_p if phi.shape[1] == 1 else dot(phi, S_p, cfg)


def read_state_transposed(x, S_p, cfg: Config):
    """x (C, Dv) @ S_p^T -> (C, F_p)."""
    if S_p.shape[0] == 1:
        return jnp.sum(x * S_p, axis=1, keepdims=True)
    return dot(x, S_p, cfg, transpose_b=True)


def outer_sum(phi, x, cfg: Config):
    """phi^T @ x: (C, F_p), (C, Dv) -> (F_p, Dv), the state increment of a chunk."""
    if phi.shape[1] == 1:
        return jnp.sum(phi * x, axis=0, keepdims=True)
    return dot(phi, x, cfg, transpose_a=True)


def score_values(cfg: Config, raw):
    """(phi(q) . phi(k), d score / d raw) from raw = q . k, without expanding features."""
    if cfg.feature_map is None:
        return raw, None
    inv_sqrt_d = 1.0 / math.sqrt(cfg.key_dim)
    s = raw * inv_sqrt_d
    return 1.0 + s + 0.5 * s * s, (1.0 + s) * inv_sqrt_d


def channel_decayed_scores(rows, columns, b, *, rows_are_queries: bool):
    """M[r, c] = sum_f rows[r, f] columns[c, f] exp(b[i, f] - b[j, f]) on causal pairs, 0
    elsewhere; (i, j) is the (query, key) position of (r, c). One pass per column, so
    every exponent is a difference of cumulative sums that is <= 0."""
    chunk = rows.shape[0]

    def add_column(c, scores):
        exponent = b - pick_row(b, c) if rows_are_queries else pick_row(b, c) - b
        terms = rows * pick_row(columns, c) * jnp.exp(jnp.minimum(exponent, 0.0))
        column = jnp.sum(terms, axis=1, keepdims=True)
        visible = row_ids(chunk) >= c if rows_are_queries else row_ids(chunk) <= c
        return jnp.where(column_ids(chunk) == c, jnp.where(visible, column, 0.0), scores)

    return lax.fori_loop(0, chunk, add_column, jnp.zeros((chunk, chunk), jnp.float32))


def channel_decayed_matmul(weights, columns, b, *, rows_are_queries: bool):
    """out[r] = sum_c weights[r, c] columns[c] * exp(b[i] - b[j]) (elementwise over channels),
    (i, j) the (query, key) position of (r, c); weights must be 0 off the causal pairs."""
    chunk = weights.shape[0]

    def add_column(c, out):
        exponent = b - pick_row(b, c) if rows_are_queries else pick_row(b, c) - b
        return out + pick_column(weights, c) * pick_row(columns, c) * jnp.exp(jnp.minimum(exponent, 0.0))

    return lax.fori_loop(0, chunk, add_column, jnp.zeros((chunk, columns.shape[1]), jnp.float32))


def intra_scores(cfg: Config, rows, columns, factors, decay, *, query_major: bool):
    """The chunk's decayed causal scores A (query-major [i, j], or key-major [j, i]) and
    d A / d raw-score factors for the backward (None where it is 1 or per channel)."""
    chunk = rows.shape[0]
    if cfg.decay == "channel":
        return channel_decayed_scores(rows, columns, decay.b, rows_are_queries=query_major), None
    scores, d_scores = score_values(cfg, dot(rows, columns, cfg, transpose_b=True))
    if factors is None:
        return jnp.where(causal_mask(chunk, query_major=query_major), scores, 0.0), d_scores
    return scores * factors.pair, d_scores


def mask_or_decay(cfg: Config, x, factors: DecayFactors | None, *, query_major: bool):
    """x on the causal pairs, times exp(b_i - b_j) per head; 0 elsewhere."""
    if factors is None or factors.pair is None:
        return jnp.where(causal_mask(x.shape[0], query_major=query_major), x, 0.0)
    return x * factors.pair


def queries_against_state(cfg: Config, q, factors, state, expansion):
    """The inter-chunk part: (numerator (C, Dv), normalizer (C, 1) or None) of the
    queries read against the incoming state."""
    numerator, normalizer = 0.0, 0.0
    for piece, (S_p, z_p) in zip(cfg.pieces, state):
        phi = features(piece, q, expansion, cfg)
        if factors is not None:
            phi = phi * factors.query
        numerator = numerator + read_state(phi, S_p, cfg)
        if cfg.normalize:
            normalizer = normalizer + jnp.sum(phi * z_p, axis=1, keepdims=True)
    return numerator, (normalizer if cfg.normalize else None)


def advance_state(cfg: Config, state, rows, values, factors, expansion, *, row_weights, token_mask=None,
                  normalizer_weights=None):
    """One chunk of the state recurrence, S_p <- exp(b_last) S_p + (phi_p(rows) w)^T values
    and z_p <- exp(b_last) z_p + sum_j phi_p(rows_j) w_j n_j.

    Forward: rows k, values v, w = exp(b_last - b_j) (row_weights "key"), n = 1. The
    backward's reverse-time pass runs the same recurrence on the state's gradient with
    rows q, values d numerator, w = exp(b_i) (row_weights "query") and n = d normalizer.
    token_mask (C, 1), from key_is_token, zeroes padding keys (taylor2's phi(0) is not 0).
    """
    new_state = []
    for piece, (S_p, z_p) in zip(cfg.pieces, state):
        phi = features(piece, rows, expansion, cfg)
        if factors is not None:
            phi = phi * getattr(factors, row_weights)
            S_p = S_p * factors.state_rows
            z_p = None if z_p is None else z_p * factors.normalizer
        if token_mask is not None:
            phi = phi * token_mask
        S_p = S_p + outer_sum(phi, values, cfg)
        if z_p is not None:
            weighted = phi if normalizer_weights is None else phi * normalizer_weights
            z_p = z_p + jnp.sum(weighted, axis=0, keepdims=True)
        new_state.append((S_p, z_p))
    return tuple(new_state)


def forward_chunk(cfg: Config, q, k, v, decay, state, expansion, token_mask):
    """-> (y (C, Dv) float32, state after the chunk)."""
    factors = decay_factors(cfg, decay, query_major=True)
    scores, _ = intra_scores(cfg, q, k, factors, decay, query_major=True)
    numerator, normalizer = queries_against_state(cfg, q, factors, state, expansion)
    numerator = numerator + dot(scores, v, cfg)
    if cfg.normalize:
        normalizer = normalizer + jnp.sum(scores, axis=1, keepdims=True)
        numerator = numerator / (normalizer + cfg.eps)
    state = advance_state(cfg, state, k, v, factors, expansion, row_weights="key", token_mask=token_mask)
    return numerator, state


class QueryGradients(NamedTuple):
    """Per chunk: dq (C, Dk); d_cumulative_q (C, 1), the query side of d loss / d B_i
    (per head only); inv_normalizer and d_normalizer (C, 1) (normalize only)."""

    dq: jnp.ndarray
    d_cumulative_q: jnp.ndarray | None
    inv_normalizer: jnp.ndarray | None
    d_normalizer: jnp.ndarray | None


def query_gradients_chunk(cfg: Config, q, k, v, do, decay, state, expansion, token_mask):
    """Forward-time pass of the backward: recompute the chunk against the incoming state
    and return (QueryGradients, state after the chunk)."""
    factors = decay_factors(cfg, decay, query_major=True)
    scores, d_scores = intra_scores(cfg, q, k, factors, decay, query_major=True)
    inter_numerator, inter_normalizer = queries_against_state(cfg, q, factors, state, expansion)
    numerator = inter_numerator + dot(scores, v, cfg)
    if cfg.normalize:
        normalizer = inter_normalizer + jnp.sum(scores, axis=1, keepdims=True)
        inv_normalizer = 1.0 / (normalizer + cfg.eps)
        d_numerator = do * inv_normalizer
        # y = numerator / (normalizer + eps): d normalizer = -(do . y) / (normalizer + eps).
        d_normalizer = -jnp.sum(do * numerator, axis=1, keepdims=True) * inv_normalizer * inv_normalizer
    else:
        inv_normalizer = d_normalizer = None
        d_numerator = do

    d_scores_out = dot(d_numerator, v, cfg, transpose_b=True)
    if cfg.normalize:
        d_scores_out = d_scores_out + d_normalizer
    d_scores_out = jnp.where(causal_mask(q.shape[0], query_major=True), d_scores_out, 0.0)

    if cfg.decay == "channel":
        dq = channel_decayed_matmul(d_scores_out, k, decay.b, rows_are_queries=True)
    else:
        d_raw = mask_or_decay(cfg, d_scores_out, factors, query_major=True)
        d_raw = d_raw if d_scores is None else d_raw * d_scores
        dq = dot(d_raw, k, cfg)
    for piece, (S_p, z_p) in zip(cfg.pieces, state):
        d_phi = read_state_transposed(d_numerator, S_p, cfg)
        if cfg.normalize:
            d_phi = d_phi + d_normalizer * z_p
        if factors is not None:
            d_phi = d_phi * factors.query
        dq_piece = features_backward(piece, q, d_phi, expansion, cfg)
        if dq_piece is not None:
            dq = dq + dq_piece

    d_cumulative_q = None
    if cfg.decay == "head":
        # Every term of y_i carries exp(B_i) on the query side.
        d_cumulative_q = jnp.sum(d_scores_out * scores, axis=1, keepdims=True)
        d_cumulative_q = d_cumulative_q + jnp.sum(d_numerator * inter_numerator, axis=1, keepdims=True)
        if cfg.normalize:
            d_cumulative_q = d_cumulative_q + d_normalizer * inter_normalizer
    new_state = advance_state(cfg, state, k, v, factors, expansion, row_weights="key", token_mask=token_mask)
    return QueryGradients(dq, d_cumulative_q, inv_normalizer, d_normalizer), new_state


class KeyValueGradients(NamedTuple):
    """Per chunk: dk (C, Dk), dv (C, Dv); d_cumulative_k (C, 1), the key side of
    d loss / d B_j (per head only)."""

    dk: jnp.ndarray
    dv: jnp.ndarray
    d_cumulative_k: jnp.ndarray | None


def key_value_gradients_chunk(
    cfg: Config, q, k, v, do, decay, inv_normalizer, d_normalizer_row, d_normalizer, d_state, expansion
):
    """Reverse-time pass of the backward: the chunk against d_state, the gradient with
    respect to the state after it, -> (KeyValueGradients, gradient w.r.t. the state
    before it). The adjoint state obeys the forward's state recurrence run backwards in
    time with (phi(q), d numerator) in place of (phi(k), v): it is advance_state.
    d_normalizer_row is d_normalizer as a (1, C) row (normalize only)."""
    factors = decay_factors(cfg, decay, query_major=False)
    d_numerator = do if inv_normalizer is None else do * inv_normalizer
    # Key-major blocks [j, i]: dk, dv and the key-side sums come out as plain matmuls.
    scores_t, d_scores_t = intra_scores(cfg, k, q, factors, decay, query_major=False)
    d_scores_out_t = dot(v, d_numerator, cfg, transpose_b=True)
    if cfg.normalize:
        d_scores_out_t = d_scores_out_t + d_normalizer_row
    d_scores_out_t = jnp.where(causal_mask(q.shape[0], query_major=False), d_scores_out_t, 0.0)

    dv = dot(scores_t, d_numerator, cfg)
    if cfg.decay == "channel":
        dk = channel_decayed_matmul(d_scores_out_t, q, decay.b, rows_are_queries=False)
    else:
        d_raw_t = mask_or_decay(cfg, d_scores_out_t, factors, query_major=False)
        d_raw_t = d_raw_t if d_scores_t is None else d_raw_t * d_scores_t
        dk = dot(d_raw_t, q, cfg)
    d_cumulative_k = jnp.sum(d_scores_out_t * scores_t, axis=1, keepdims=True) if cfg.decay == "head" else None

    for piece, (dS_p, dz_p) in zip(cfg.pieces, d_state):
        phi_k = features(piece, k, expansion, cfg)
        if factors is not None:
            phi_k = phi_k * factors.key
        dv_inter = read_state(phi_k, dS_p, cfg)
        dv = dv + dv_inter
        d_phi_k = read_state_transposed(v, dS_p, cfg)
        if dz_p is not None:
            d_phi_k = d_phi_k + dz_p
        if d_cumulative_k is not None:
            d_cumulative_k = d_cumulative_k + jnp.sum(v * dv_inter, axis=1, keepdims=True)
            if dz_p is not None:
                d_cumulative_k = d_cumulative_k + jnp.sum(phi_k * dz_p, axis=1, keepdims=True)
        if factors is not None:
            d_phi_k = d_phi_k * factors.key
        dk_piece = features_backward(piece, k, d_phi_k, expansion, cfg)
        if dk_piece is not None:
            dk = dk + dk_piece
    d_state = advance_state(
        cfg, d_state, q, d_numerator, factors, expansion, row_weights="query", normalizer_weights=d_normalizer
    )
    return KeyValueGradients(dk, dv, d_cumulative_k), d_state


def selection_matrices(head_dim: int):
    """(E_first, E_second), float32 [d, d^2]: x @ E_first repeats each x_a d times and
    x @ E_second tiles x d times, so their product is row-major vec(x outer x)."""
    pairs = jnp.arange(head_dim * head_dim)
    channels = jnp.arange(head_dim)[:, None]
    first = (pairs[None, :] // head_dim == channels).astype(jnp.float32)
    second = (pairs[None, :] % head_dim == channels).astype(jnp.float32)
    return first, second
