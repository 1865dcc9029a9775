"""Time and memory of kernel ops against sequence length.

    python -m kernels.bench [--ops attention] [--lengths 1024,2048,4096,8192]
        [--implementations reference,xla] [--batch 1 --heads 8 --head-dim 64]
        [--window N] [--backward]

Prints one table per op: implementation x sequence length -> median time,
compiled temp memory (the number that shows quadratic against linear growth),
peak memory, and ratios against the reference. Memory comes from the compiled
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


OPS: dict[str, OpBenchmark] = {
    # Flash-style backward recomputes scores: 5 block matmuls against the forward's 2.
    "attention": OpBenchmark(_attention_inputs, _attention_function, _attention_flops, 1 + 2.5),
}


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
        baseline = by_implementation.get("reference")
        for implementation, result in by_implementation.items():
            rows.append(_format_row(problem.seq_len, implementation, result, baseline, flops))

    first = problems[0]
    print(
        f"\n{name} ({'forward + backward' if backward else 'forward'}) on {jax.default_backend()}: "
        f"B={first.batch} H={first.heads} K={first.kv_heads} D={first.head_dim} "
        f"window={first.window} prefix={first.prefix} dtype={jnp.dtype(first.dtype).name}, "
        f"median of {repeats}"
    )
    columns = ["impl", "T", "time ms", "time/ref", "temp MiB", "temp/ref", "peak MiB", "TFLOP/s"]
    if jax.default_backend() != "cpu":
        columns.append("device peak MiB")
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def _format_row(seq_len, implementation, result: Measurement, baseline: Measurement | None, flops: float):
    if result.error is not None:
        row = [implementation, str(seq_len), f"failed: {result.error}", "", "", "", "", ""]
    else:
        row = [
            implementation,
            str(seq_len),
            f"{result.median_ms:.1f}",
            _ratio(result.median_ms, baseline and baseline.median_ms),
            _mib(result.temp_bytes),
            _ratio(result.temp_bytes, baseline and baseline.temp_bytes),
            _mib(result.total_bytes),
            f"{flops / (result.median_ms * 1e-3) / 1e12:.3f}",
        ]
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
