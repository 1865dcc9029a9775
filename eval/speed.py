"""Model throughput against context length: prefill and decode tokens/s and decode-state bytes.

    python -m eval.speed --configs tiny,based-tiny --lengths 1k,32k

For each preset's model (freshly initialised; speed does not depend on the
weights) and each context length L, the context is streamed through `prefill`
in chunks, then `--decode-tokens` tokens are decoded greedily with `step` inside
one jitted scan. A recurrent model's decode cost and state stay flat in L;
attention's KV cache, and so its decode cost, grow with L. Timings are medians
of `--repeats` runs in one process, so compare ratios within one table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch import build_model
from eval.needles import parse_lengths
from train.config import load_config


@nnx.jit
def _prefill(model, tokens_BT, state):
    logits, state = model.prefill(tokens_BT, state)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), state


@nnx.jit(static_argnums=3)
def _decode(model, token_B, state, steps: int):
    def body(carry, _):
        token, state = carry
        logits, state = model.step(token, state)
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), state), None

    (token, _), _ = jax.lax.scan(body, (token_B, state), None, length=steps)
    return token


def _timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up (compilation) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(preset: str, length: int, *, batch: int, chunk: int, decode_tokens: int, repeats: int) -> dict:
    cfg = load_config(preset).model
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, length + decode_tokens))
    model = build_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    chunks = [tokens[:, start : start + chunk] for start in range(0, length, chunk)]

    def run_prefill():
        state = model.init_state(batch, length + decode_tokens)
        for piece in chunks:
            last, state = _prefill(model, piece, state)
        return last, state

    prefill_seconds = _timed(lambda: run_prefill()[0], repeats)
    last, state = run_prefill()
    decode_seconds = _timed(lambda: _decode(model, last, state, decode_tokens), repeats)
    return {
        "preset": preset,
        "mixers": ",".join(dict.fromkeys(cfg.layers)),
        "length": length,
        "prefill_tokens_per_s": batch * length / prefill_seconds,
        "decode_tokens_per_s": batch * decode_tokens / decode_seconds,
        "state_bytes": model.state_bytes(batch, length),
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'preset':<14} {'mixers':<40} {'context':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'vs first':>9} {'state MiB':>10}"
    lines = [header]
    first_decode: dict[str, float] = {}
    for row in rows:
        base = first_decode.setdefault(row["preset"], row["decode_tokens_per_s"])
        lines.append(
            f"{row['preset']:<14} {row['mixers']:<40} {row['length']:>8} {row['prefill_tokens_per_s']:>14,.0f} "
            f"{row['decode_tokens_per_s']:>13,.0f} {row['decode_tokens_per_s'] / base:>9.2f} "
            f"{row['state_bytes'] / 2**20:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,based-tiny", help="comma-separated presets (or .py paths)")
    parser.add_argument("--lengths", default="1k,32k", help="context lengths, e.g. 1k,4k,32k")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for preset in (name.strip() for name in args.configs.split(",") if name.strip()):
        for length in parse_lengths(args.lengths):
            rows.append(
                measure(
                    preset,
                    length,
                    batch=args.batch,
                    chunk=args.chunk,
                    decode_tokens=args.decode_tokens,
                    repeats=args.repeats,
                )
            )
            print(format_table(rows).splitlines()[-1], flush=True)
    print(f"\non {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {args.batch}, median of {args.repeats}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
