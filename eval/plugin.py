"""eval's plugin for train (entry point `memzoo.plugins`): registers the synthetic tasks as data
sources and adds the `memzoo bench` and `memzoo eval` commands."""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

import eval.tasks  # noqa: F401  (registers "mqar", "passkey" and "niah" as data sources)


def _split(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__} values, got {text!r}")


def _bench(args: argparse.Namespace) -> int:
    import configs.mqar
    from eval import protocol_mqar

    preset = configs.mqar.QUICK if args.quick else configs.mqar.FULL
    given = {
        "mixers": args.mixers,
        "d_models": args.d_model,
        "seq_lens": args.seq_len,
        "kv_pairs": args.kv_pairs,
        "lrs": args.lrs,
        "vocab_size": args.vocab_size,
        "train_examples": args.train_examples,
        "test_examples": args.test_examples,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "test_length_factors": args.test_length_factors,
        "seed": args.seed,
    }
    fields = {**preset, **{name: value for name, value in given.items() if value is not None}}
    grid = protocol_mqar.MqarGrid(**fields, mixer_settings=configs.mqar.MIXER_SETTINGS)
    outputs = protocol_mqar.run(grid, args.out)
    print(outputs["markdown"].read_text())
    print("memzoo: wrote " + ", ".join(str(path) for path in outputs.values()))
    return 0


def _parse_override(item: str) -> tuple[str, object]:
    from arch.config import ConfigError

    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. haystack=kv")
    name, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return name.strip(), value


def _eval(args: argparse.Namespace) -> int:
    from eval import needles

    outputs = needles.run(
        args.task,
        args.checkpoint,
        lengths=needles.parse_lengths(args.lengths),
        depths=needles.parse_depths(args.depths),
        samples=args.samples,
        out_dir=pathlib.Path(args.out or pathlib.Path(args.checkpoint) / f"eval-{args.task}"),
        overrides=dict(_parse_override(item) for item in args.set),
        chunk=args.chunk,
        batch_size=args.batch_size,
        seed=args.seed,
        step=args.step,
    )
    print(outputs["markdown"].read_text())
    print("memzoo: wrote " + ", ".join(str(path) for path in outputs.values()), file=sys.stderr)
    return 0


def add_commands(commands) -> None:
    """Add `bench` and `eval` to the `memzoo` subcommands."""
    bench = commands.add_parser("bench", help="recall benchmarks: `memzoo bench mqar` (the zoology MQAR protocol)")
    bench.add_argument("benchmark", choices=["mqar"])
    bench.add_argument("--quick", action="store_true", help="the small grid (configs/mqar.py QUICK): ~10 min on a CPU")
    bench.add_argument(
        "--mixers",
        type=lambda text: _split(text, str),
        help="comma-separated mixer names, or variants from configs/mqar.py MIXER_SETTINGS (e.g. based-f8,based-f24)",
    )
    bench.add_argument("--d-model", type=lambda text: _split(text, int), help="model widths, e.g. 64,128")
    bench.add_argument("--seq-len", type=lambda text: _split(text, int), help="training lengths, e.g. 64,128,256")
    bench.add_argument(
        "--kv-pairs", type=lambda text: _split(text, int), help="key-value pairs: one for all lengths or one per length"
    )
    bench.add_argument("--lrs", type=lambda text: _split(text, float), help="learning rates swept per point")
    bench.add_argument("--vocab-size", type=int, help="MQAR vocabulary (default 8192)")
    bench.add_argument("--train-examples", type=int)
    bench.add_argument("--test-examples", type=int)
    bench.add_argument("--batch-size", type=int)
    bench.add_argument("--epochs", type=int, help="at most this many epochs (early stop at 0.99 accuracy)")
    bench.add_argument("--warmup-epochs", type=float, help="linear learning-rate warmup, in epochs (zoology: 0)")
    bench.add_argument(
        "--test-length-factors", type=lambda text: _split(text, int), help="held-out lengths as multiples, e.g. 2,4"
    )
    bench.add_argument("--seed", type=int)
    bench.add_argument("--out", help="output folder (default: runs/bench-mqar-TIME)")
    bench.set_defaults(run=_bench)

    evaluate = commands.add_parser("eval", help="score a checkpoint on needle retrieval over lengths and depths")
    evaluate.add_argument("task", choices=["niah", "passkey"])
    evaluate.add_argument("--checkpoint", required=True, help="a run's workdir (or its checkpoints folder)")
    evaluate.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 512,1k,2k (k = 1024)")
    evaluate.add_argument("--depths", default="0:1:11", help="needle depths: START:STOP:COUNT or a list like 0,0.5,1")
    evaluate.add_argument("--samples", type=int, default=10, help="prompts per (length, depth) cell")
    evaluate.add_argument(
        "--set", action="append", default=[], metavar="OPTION=VALUE",
        help="task option, e.g. variant=multikey or haystack=kv (default: the options the checkpoint trained on)",
    )
    evaluate.add_argument("--chunk", type=int, default=512, help="prefill chunk: tokens read per call")
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--out", help="output folder (default: CHECKPOINT/eval-TASK)")
    evaluate.set_defaults(run=_eval)
