"""Time and memory of kernel ops against sequence length.

    python -m kernels.bench [--ops attention] [--lengths 1024,2048,4096,8192]
        [--implementations reference,xla] [--batch 1 --heads 8 --head-dim 64]
        [--window N] [--backward]

Prints one table per op: implementation x sequence length -> median time,
compiled temp memory (the number that shows quadratic against linear growth),
peak memory, ratios against the reference, TFLOP/s and GB/s (the op's
unavoidable HBM traffic over the time), and on a known GPU or TPU both as a
percentage of the chip's bfloat16 matmul and HBM peaks. Memory comes from the compiled
executable's memory_analysis() (arguments + outputs + temp) on every backend;
on TPU and GPU the device's peak_bytes_in_use is printed too (a process-wide
high-water mark, so read it in table order). A new op adds one OpBenchmark
entry to OPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import kernels

_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark point: the shapes and op options shared by every implementation."""

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    prefix: int
    dtype: jnp.dtype


@dataclasses.dataclass(frozen=True)
class OpBenchmark:
    """How to benchmark one op."""

    # Problem -> the positional array inputs of the op.
    make_inputs: Callable[[Problem], tuple]
    # (problem, implementation) -> function of those inputs returning the output.
    make_function: Callable[[Problem, str], Callable]
    # Problem -> floating-point operations of one forward call.
    forward_flops: Callable[[Problem], float]
    # Forward + backward cost as a multiple of the forward cost.
    forward_backward_flops_factor: float
    # Problem -> bytes one forward call must move to and from HBM (inputs read, outputs written).
    forward_bytes: Callable[[Problem], float] | None = None
    # Forward + backward traffic as a multiple of the forward traffic.
    forward_backward_bytes_factor: float = 1.0
    # False for ops that are not differentiated (decode forms); --backward skips them.
    differentiable: bool = True


def _attention_inputs(problem: Problem):
    rng = np.random.default_rng(0)
    q_shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    kv_shape = (problem.batch, problem.seq_len, problem.kv_heads, problem.head_dim)
    return tuple(
        jnp.asarray(rng.standard_normal(shape, np.float32), problem.dtype)
        for shape in (q_shape, kv_shape, kv_shape)
    )


def _attention_function(problem: Problem, implementation: str):
    def attention(q, k, v):
        return kernels.attention(
            q, k, v, window=problem.window, prefix=problem.prefix, implementation=implementation
        )

    return attention


def _attention_flops(problem: Problem) -> float:
    """4 * B * H * D per visible (query, key) pair: 2 * D for q.k and 2 * D for p.v.

    Full causal has T (T + 1) / 2 pairs, about 2 * B * H * T^2 * D flops.
    """
    query = np.arange(problem.seq_len)
    if problem.window is None:
        visible_pairs = np.sum(query + 1)
    else:
        in_window = np.minimum(query + 1, problem.window)
        prefix_before_window = np.clip(query - problem.window + 1, 0, problem.prefix)
        visible_pairs = np.sum(in_window + prefix_before_window)
    return 4.0 * problem.batch * problem.heads * problem.head_dim * float(visible_pairs)


def _attention_bytes(problem: Problem) -> float:
    """q, k, v read and o written once."""
    itemsize = jnp.dtype(problem.dtype).itemsize
    tokens = problem.batch * problem.seq_len * problem.head_dim
    return float(itemsize * tokens * (2 * problem.heads + 2 * problem.kv_heads))


def _decode_cache_slots(problem: Problem) -> int:
    """Capacity of the cache the decode benchmark attends over: seq_len past tokens + 1."""
    if problem.window is None:
        return problem.seq_len + 1
    return min(problem.seq_len + 1, problem.prefix + problem.window)


def _attention_decode_inputs(problem: Problem):
    """One new token at position seq_len against a cache holding tokens 0 .. seq_len - 1."""
    rng = np.random.default_rng(0)
    capacity = _decode_cache_slots(problem)
    q_shape = (problem.batch, 1, problem.heads, problem.head_dim)
    kv_shape = (problem.batch, 1, problem.kv_heads, problem.head_dim)
    cache_shape = (problem.batch, capacity, problem.kv_heads, problem.head_dim)
    q, k, v, cache_k, cache_v = (
        jnp.asarray(rng.standard_normal(shape, np.float32), problem.dtype)
        for shape in (q_shape, kv_shape, kv_shape, cache_shape, cache_shape)
    )
    # The slots the public cache layout gives: prefix slots, then a ring (last writer wins).
    positions = np.arange(problem.seq_len)
    ring_size = max(capacity - problem.prefix, 1)
    slots = np.where(positions < problem.prefix, positions, problem.prefix + (positions - problem.prefix) % ring_size)
    slot_pos = np.full(capacity, -1, np.int32)
    np.maximum.at(slot_pos, slots, positions.astype(np.int32))
    cache = kernels.KVCache(cache_k, cache_v, jnp.asarray(slot_pos), jnp.asarray(problem.seq_len, jnp.int32))
    return q, k, v, cache


def _attention_decode_function(problem: Problem, implementation: str):
    def attention_decode(q, k, v, cache):
        o, _ = kernels.attention_decode(
            q, k, v, cache, window=problem.window, prefix=problem.prefix, implementation=implementation
        )
        return o

    return attention_decode


def _attention_decode_flops(problem: Problem) -> float:
    visible = _decode_cache_slots(problem)
    return 4.0 * problem.batch * problem.heads * problem.head_dim * visible


def _attention_decode_bytes(problem: Problem) -> float:
    """The cache's keys and values read once, plus q, the new k, v and o."""
    itemsize = jnp.dtype(problem.dtype).itemsize
    cache = 2 * (_decode_cache_slots(problem) - 1) * problem.kv_heads
    token = 2 * problem.heads + 2 * problem.kv_heads
    return float(itemsize * problem.batch * problem.head_dim * (cache + token))


# Linear attention is benchmarked with a per-head log-decay (the gated form), no
# normalizer, the identity feature map and the default chunk of 64.
_LINEAR_ATTENTION_CHUNK = 64


def _linear_attention_inputs(problem: Problem):
    """q, k, v [B, T, H, D] and a per-head log-decay in [-0.1, -0.01] (float32)."""
    rng = np.random.default_rng(0)
    shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), problem.dtype) for _ in range(3))
    log_decay = jnp.asarray(-rng.uniform(0.01, 0.1, shape[:3]), jnp.float32)
    return q, k, v, log_decay


def _linear_attention_function(problem: Problem, implementation: str):
    def linear_attention(q, k, v, log_decay):
        return kernels.linear_attention(
            q, k, v, log_decay=log_decay, chunk_size=_LINEAR_ATTENTION_CHUNK, implementation=implementation
        )

    return linear_attention


def _linear_attention_flops(problem: Problem) -> float:
    """The chunked form's matmuls per token and head: q.k scores and scores @ v over its
    chunk (2 C D each), its read of the state and its share of the state update (2 D^2 each)."""
    chunk = min(_LINEAR_ATTENTION_CHUNK, problem.seq_len)
    per_token = 4.0 * chunk * problem.head_dim + 4.0 * problem.head_dim**2
    return problem.batch * problem.seq_len * problem.heads * per_token


def _linear_attention_bytes(problem: Problem) -> float:
    """q, k, v and the float32 log-decay read, y written once."""
    itemsize = jnp.dtype(problem.dtype).itemsize
    tokens = problem.batch * problem.seq_len * problem.heads
    return float(tokens * (4 * itemsize * problem.head_dim + 4))


# The delta rule is benchmarked in its gated form (per-head log-decay) with unit-norm keys,
# beta in (0, 1) and the default chunk of 64.
_DELTA_RULE_CHUNK = 64


def _delta_rule_inputs(problem: Problem):
    """q, k (unit norm), v [B, T, H, D]; beta in [0.1, 1] and log-decay in [-0.1, -0.01], float32."""
    rng = np.random.default_rng(0)
    shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.1, 1.0, shape[:3]), jnp.float32)
    log_decay = jnp.asarray(-rng.uniform(0.01, 0.1, shape[:3]), jnp.float32)
    return (*(jnp.asarray(x, problem.dtype) for x in (q, k, v)), beta, log_decay)


def _delta_rule_function(problem: Problem, implementation: str):
    def delta_rule(q, k, v, beta, log_decay):
        return kernels.delta_rule(
            q, k, v, beta, log_decay=log_decay, chunk_size=_DELTA_RULE_CHUNK, implementation=implementation
        )

    return delta_rule


def _delta_rule_flops(problem: Problem) -> float:
    """The chunked (WY) form's matmuls per token and head: K K^T, Q K^T, the two WY
    factors and scores @ delta over its chunk (2 C D each), and its reads and update of
    the state (W S, Q S, K^T delta: 2 D^2 each); the triangular inverse is left out."""
    chunk = min(_DELTA_RULE_CHUNK, problem.seq_len)
    per_token = 10.0 * chunk * problem.head_dim + 6.0 * problem.head_dim**2
    return problem.batch * problem.seq_len * problem.heads * per_token


def _delta_rule_bytes(problem: Problem) -> float:
    """q, k, v and the float32 beta and log-decay read, y written once."""
    itemsize = jnp.dtype(problem.dtype).itemsize
    tokens = problem.batch * problem.seq_len * problem.heads
    return float(tokens * (4 * itemsize * problem.head_dim + 8))


# The Titans memory is benchmarked as the mixer uses it: depth 2 (hidden 4 * D), momentum
# and weight decay on, unit-norm q and k, the default chunk of 64.
_TITANS_CHUNK = 64
_TITANS_DEPTH = 2


def _titans_memory_inputs(problem: Problem):
    """q, k (unit norm), v [B, T, H, D]; theta in [0.01, 0.1], eta in [0.8, 1], 1 - alpha in
    [0.95, 1] as logs (float32); W_0 per layer [H, din, dout] with 1 / sqrt(din) entries."""
    rng = np.random.default_rng(0)
    shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    per_token = lambda low, high: jnp.asarray(rng.uniform(low, high, shape[:3]), jnp.float32)
    lr, log_momentum, log_retain = per_token(0.01, 0.1), jnp.log(per_token(0.8, 1.0)), jnp.log(per_token(0.95, 1.0))
    weights = tuple(
        jnp.asarray(rng.standard_normal((problem.heads, din, dout)) / np.sqrt(din), jnp.float32)
        for din, dout in kernels.memory_layer_shapes(problem.head_dim, problem.head_dim, _TITANS_DEPTH)
    )
    return (*(jnp.asarray(x, problem.dtype) for x in (q, k, v)), lr, log_momentum, log_retain, weights)


def _titans_memory_function(problem: Problem, implementation: str):
    def titans_memory(q, k, v, lr, log_momentum, log_retain, weights):
        return kernels.titans_memory(
            q, k, v, lr, log_momentum=log_momentum, log_retain=log_retain, initial_weights=weights,
            chunk_size=_TITANS_CHUNK, implementation=implementation,
        )

    return titans_memory


def _titans_memory_flops(problem: Problem) -> float:
    """The dual form's matmuls per token and head, each layer [din, dout]: the key's pass
    at the anchor and its error back (2 din dout each), the query's reads of W0 and S0
    (2 din dout each), the W and S updates (2 din dout each), the query-key products and
    their mixing of the errors (2 C din, 2 C dout); plus the chunk's N P product (2 C^2)."""
    chunk = min(_TITANS_CHUNK, problem.seq_len)
    layers = kernels.memory_layer_shapes(problem.head_dim, problem.head_dim, _TITANS_DEPTH)
    per_token = sum(12.0 * din * dout + 2.0 * chunk * (din + dout) for din, dout in layers) + 2.0 * chunk**2
    return problem.batch * problem.seq_len * problem.heads * per_token


def _titans_memory_bytes(problem: Problem) -> float:
    """q, k, v and the three float32 per-token gates read, y written once."""
    itemsize = jnp.dtype(problem.dtype).itemsize
    tokens = problem.batch * problem.seq_len * problem.heads
    return float(tokens * (4 * itemsize * problem.head_dim + 12))


OPS: dict[str, OpBenchmark] = {
    # Flash-style backward recomputes scores: 5 block matmuls against the forward's 2.
    # Its traffic: the forward's, then q, k, v, o, do read and dq, dk, dv written.
    "attention": OpBenchmark(
        _attention_inputs,
        _attention_function,
        _attention_flops,
        1 + 2.5,
        forward_bytes=_attention_bytes,
        forward_backward_bytes_factor=3.0,
    ),
    "attention_decode": OpBenchmark(
        _attention_decode_inputs,
        _attention_decode_function,
        _attention_decode_flops,
        1.0,
        forward_bytes=_attention_decode_bytes,
        differentiable=False,
    ),
    # Backward: a forward-time pass (recomputed scores and state, dq) and a reverse-time
    # pass (dk, dv, the state's gradient), about three forwards; q, k, v, g, do read twice.
    "linear_attention": OpBenchmark(
        _linear_attention_inputs,
        _linear_attention_function,
        _linear_attention_flops,
        1 + 3.0,
        forward_bytes=_linear_attention_bytes,
        forward_backward_bytes_factor=3.0,
    ),
    # Backward: per chunk, the forward's factors recomputed from the stored state, then 16
    # matmuls against the forward's 8; q, k, v, beta, g read twice, dy read, grads written.
    "delta_rule": OpBenchmark(
        _delta_rule_inputs,
        _delta_rule_function,
        _delta_rule_flops,
        1 + 3.0,
        forward_bytes=_delta_rule_bytes,
        forward_backward_bytes_factor=3.0,
    ),
    # Backward: the XLA form's VJP, which recomputes the forward by checkpointed groups of
    # chunks and then runs the reverse pass (about twice a forward).
    "titans_memory": OpBenchmark(
        _titans_memory_inputs,
        _titans_memory_function,
        _titans_memory_flops,
        1 + 3.0,
        forward_bytes=_titans_memory_bytes,
        forward_backward_bytes_factor=3.0,
    ),
}


@dataclasses.dataclass(frozen=True)
class ChipPeak:
    """Dense bfloat16 matmul throughput and HBM bandwidth of one chip (vendor figures)."""

    tflops: float
    hbm_gb_per_s: float


# Matched in order against jax's device_kind: specific names before their prefixes.
_CHIP_PEAKS: tuple[tuple[tuple[str, ...], ChipPeak], ...] = (
    (("h100", "pcie"), ChipPeak(756.0, 2000.0)),
    (("h100",), ChipPeak(989.0, 3350.0)),
    (("h200",), ChipPeak(989.0, 4800.0)),
    (("a100", "40gb"), ChipPeak(312.0, 1555.0)),
    (("a100",), ChipPeak(312.0, 2039.0)),
    (("tpu v4",), ChipPeak(275.0, 1228.0)),
    (("tpu v5 lite",), ChipPeak(197.0, 819.0)),
    (("tpu v5e",), ChipPeak(197.0, 819.0)),
    (("tpu v5",), ChipPeak(459.0, 2765.0)),
    (("tpu v6",), ChipPeak(918.0, 1640.0)),
)


def chip_peak(device_kind: str) -> ChipPeak | None:
    """The peak figures of a device kind such as "NVIDIA H100 80GB HBM3" or "TPU v5 lite"."""
    kind = device_kind.lower()
    for keywords, peak in _CHIP_PEAKS:
        if all(keyword in kind for keyword in keywords):
            return peak
    return None


@dataclasses.dataclass
class Measurement:
    median_ms: float | None = None
    temp_bytes: int | None = None
    total_bytes: int | None = None
    device_peak_bytes: int | None = None
    error: str | None = None


def measure(fn: Callable, inputs: tuple, repeats: int) -> Measurement:
    """Compile, run once to warm up, then time `repeats` runs; memory from the executable."""
    try:
        compiled = jax.jit(fn).lower(*inputs).compile()
        memory = compiled.memory_analysis()
        result = Measurement()
        if memory is not None:
            result.temp_bytes = memory.temp_size_in_bytes
            result.total_bytes = (
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes
            )
        jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
        result.median_ms = 1e3 * statistics.median(times)
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            result.device_peak_bytes = stats["peak_bytes_in_use"]
        return result
    except Exception as error:  # a failed point (often out of memory) must not end the sweep
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return Measurement(error=message[:60])


def _forward_and_backward(fn: Callable) -> Callable:
    """The gradient of sum(output) with respect to every input (float32 loss)."""

    def loss(*inputs):
        return jnp.sum(fn(*inputs).astype(jnp.float32))

    def gradients(*inputs):
        return jax.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)

    return gradients


def run_op(name: str, op: OpBenchmark, problems: list[Problem], implementations: list[str], *, backward: bool, repeats: int):
    """Measure every (length, implementation) point and print the table."""
    if backward and not op.differentiable:
        print(f"\n{name}: skipped under --backward (it is not differentiated)")
        return
    on_accelerator = jax.default_backend() != "cpu"
    device_kind = jax.devices()[0].device_kind
    peak = chip_peak(device_kind) if on_accelerator else None
    rows = []
    for problem in problems:
        inputs = op.make_inputs(problem)
        by_implementation = {}
        for implementation in implementations:
            fn = op.make_function(problem, implementation)
            if backward:
                fn = _forward_and_backward(fn)
            by_implementation[implementation] = measure(fn, inputs, repeats)
        flops = op.forward_flops(problem) * (op.forward_backward_flops_factor if backward else 1.0)
        num_bytes = None
        if op.forward_bytes is not None:
            num_bytes = op.forward_bytes(problem) * (op.forward_backward_bytes_factor if backward else 1.0)
        baseline = by_implementation.get("reference")
        for implementation, result in by_implementation.items():
            rows.append(_format_row(problem.seq_len, implementation, result, baseline, flops, num_bytes, peak))

    first = problems[0]
    print(
        f"\n{name} ({'forward + backward' if backward else 'forward'}) on {jax.default_backend()}: "
        f"B={first.batch} H={first.heads} K={first.kv_heads} D={first.head_dim} "
        f"window={first.window} prefix={first.prefix} dtype={jnp.dtype(first.dtype).name}, "
        f"median of {repeats}"
    )
    if peak is not None:
        print(f"{device_kind}: peak {peak.tflops:g} TFLOP/s (bfloat16 matmul), {peak.hbm_gb_per_s:g} GB/s HBM")
    elif on_accelerator:
        print(f"{device_kind}: no peak figures known for this chip; add it to kernels.bench._CHIP_PEAKS")
    columns = ["impl", "T", "time ms", "time/ref", "temp MiB", "temp/ref", "peak MiB", "TFLOP/s", "GB/s"]
    if peak is not None:
        columns += ["%peak FLOP/s", "%peak HBM"]
    if on_accelerator:
        columns.append("device peak MiB")
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def _format_row(
    seq_len,
    implementation,
    result: Measurement,
    baseline: Measurement | None,
    flops: float,
    num_bytes: float | None,
    peak: ChipPeak | None,
):
    if result.error is not None:
        row = [implementation, str(seq_len), f"failed: {result.error}", "", "", "", "", "", ""]
        if peak is not None:
            row += ["", ""]
    else:
        seconds = result.median_ms * 1e-3
        tflops = flops / seconds / 1e12
        gb_per_s = None if num_bytes is None else num_bytes / seconds / 1e9
        row = [
            implementation,
            str(seq_len),
            f"{result.median_ms:.3g}",
            _ratio(result.median_ms, baseline and baseline.median_ms),
            _mib(result.temp_bytes),
            _ratio(result.temp_bytes, baseline and baseline.temp_bytes),
            _mib(result.total_bytes),
            f"{tflops:.3f}",
            "-" if gb_per_s is None else f"{gb_per_s:.1f}",
        ]
        if peak is not None:
            row.append(f"{100 * tflops / peak.tflops:.1f}")
            row.append("-" if gb_per_s is None else f"{100 * gb_per_s / peak.hbm_gb_per_s:.1f}")
    if jax.default_backend() != "cpu":
        row.append(_mib(result.device_peak_bytes))
    return row


def _ratio(value, baseline) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}"


def _mib(num_bytes) -> str:
    return "-" if num_bytes is None else f"{num_bytes / _MIB:.1f}"


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=_name_list, default=list(OPS), help=f"comma-separated; known: {','.join(OPS)}")
    parser.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--implementations", type=_name_list, default=["reference", "xla"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="defaults to --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--prefix", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backward", action="store_true", help="time forward + gradients of all inputs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    unknown = [name for name in args.ops if name not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {sorted(OPS)}")
    for name in args.ops:
        available = kernels.available_ops()[name]
        missing = [impl for impl in args.implementations if impl not in available]
        if missing:
            parser.error(f"{name} has no implementation(s) {missing}; available: {available}")
    problems = [
        Problem(
            batch=args.batch,
            seq_len=seq_len,
            heads=args.heads,
            kv_heads=args.kv_heads or args.heads,
            head_dim=args.head_dim,
            window=args.window,
            prefix=args.prefix,
            dtype=jnp.dtype(args.dtype),
        )
        for seq_len in args.lengths
    ]
    for name in args.ops:
        run_op(name, OPS[name], problems, args.implementations, backward=args.backward, repeats=args.repeats)


if __name__ == "__main__":
    main()
