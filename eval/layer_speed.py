"""One mixer layer's training cost against sequence length: forward + backward time,
tokens/s and peak resident memory.

    python -m eval.layer_speed --mixer titans_lmm --d-model 256 --heads 1 --batch 2 \\
        --lengths 1024,4096 --option chunk_size=64 --option depth=2

Each length runs in a fresh process (so peak RSS belongs to that length alone), on one
CPU core with single-threaded XLA by default (`--threads 0` lifts both). The step is
the gradient of sum(y^2) with respect to the layer's parameters and its input, jitted;
the time is the median of `--repeats` steps after a compiling warm-up. A layer whose
training form is linear in T keeps tokens/s and peak RSS flat as T grows.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _parse_option(text: str) -> tuple[str, object]:
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"--option must be NAME=VALUE (e.g. chunk_size=64), got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths must be comma-separated ints, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths must be positive, got {text!r}")
    return lengths


def measure(mixer: str, options: dict, *, d_model: int, heads: int, batch: int, length: int, repeats: int) -> dict:
    """Time the layer's jitted forward + backward at one length, in this process."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arch import registry
    from arch.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=256,
        d_model=d_model,
        n_layers=1,
        n_heads=heads,
        layers=(mixer,),
        mixer_options={mixer: options} if options else {},
        max_seq_len=length,
    )
    registry.validate_sequence_length(cfg, length)
    with nnx.use_eager_sharding(False):  # no mesh here: parameters stay unsharded
        layer = registry.build_mixer(cfg, mixer, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (batch, length, d_model), jnp.float32)

    @jax.jit
    def gradients(params, x):
        def loss(params, x):
            y = nnx.merge(graphdef, params)(x)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    jax.block_until_ready(gradients(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(gradients(params, x))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "length": length,
        "seconds_per_step": seconds,
        "tokens_per_s": batch * length / seconds,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_worker(args, length: int) -> dict:
    command = [
        sys.executable, "-m", "eval.layer_speed", "--worker",
        "--mixer", args.mixer, "--d-model", str(args.d_model), "--heads", str(args.heads),
        "--batch", str(args.batch), "--lengths", str(length), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
    ]
    for name, value in args.option:
        command += ["--option", f"{name}={value!r}"]
    env = dict(os.environ)
    if args.threads == 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_SINGLE_THREAD_XLA_FLAGS}".strip()
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"layer_speed: the run at length {length} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        "| length | s/step | tokens/s | peak RSS MiB | tokens/s vs first | RSS vs first |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['length']} | {row['seconds_per_step']:.3f} | {row['tokens_per_s']:,.0f} | "
            f"{row['peak_rss_mib']:,.0f} | {row['tokens_per_s'] / first['tokens_per_s']:.2f} | "
            f"{row['peak_rss_mib'] / first['peak_rss_mib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.layer_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", default="titans_lmm", help="a registered mixer name")
    parser.add_argument("--option", type=_parse_option, action="append", default=[], help="mixer option NAME=VALUE")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=_parse_lengths, default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, choices=(0, 1), help="1: one core, single-threaded XLA; 0: no limit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = dict(args.option)
    if args.worker:
        if args.threads == 1 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        row = measure(
            args.mixer, options, d_model=args.d_model, heads=args.heads, batch=args.batch,
            length=args.lengths[0], repeats=args.repeats,
        )
        print(json.dumps(row))
        return
    rows = [_run_worker(args, length) for length in args.lengths]
    settings = ", ".join(f"{name}={value}" for name, value in args.option) or "defaults"
    print(
        f"{args.mixer} ({settings}): d_model {args.d_model}, {args.heads} head(s), batch {args.batch}, "
        f"forward + backward, {'one thread' if args.threads == 1 else 'all threads'}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
