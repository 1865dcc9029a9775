"""The `memzoo` command line: train, info and generate, and the commands plugins add (bench, eval).

Errors in what the user typed (a config field, a preset name, a path) come out as
one line, `memzoo: error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

DEFAULT_PRESET = "tiny"


def _train(args: argparse.Namespace) -> int:
    from train import config as config_lib
    from train.checkpoint import Checkpointer, checkpoint_dir

    if args.resume and args.workdir is None:
        raise config_lib.ConfigError("--resume needs --workdir: the run directory to continue")
    if args.resume and args.config is None:
        # Continue with the run's own saved config; --set may still extend `steps` and the like.
        checkpointer = Checkpointer(args.workdir)
        try:
            cfg = checkpointer.restore_config()
        finally:
            checkpointer.close()
    else:
        cfg = config_lib.load_config(args.config or DEFAULT_PRESET)
    cfg = config_lib.apply_overrides(cfg, args.set)
    workdir = pathlib.Path(args.workdir or f"runs/{cfg.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")

    from train.loop import train, unigram_entropy
    from train import data as data_lib

    if not args.resume and not checkpoint_dir(workdir).is_dir():
        entropy = unigram_entropy(data_lib.eval_batches(cfg.data))
        print(f"memzoo: training {cfg.name} in {workdir}; held-out unigram entropy {entropy:.3f} nats/token")
    result = train(cfg, workdir, resume=args.resume)
    summary = f"memzoo: stopped at step {result.steps_done}"
    if result.losses:
        summary += f", loss {result.losses[max(result.losses)]:.4f}"
    if result.eval_losses:
        summary += f", held-out loss {result.eval_losses[max(result.eval_losses)]:.4f}"
    summary += f", {result.tokens_per_second:,.0f} tokens/s; checkpoints in {checkpoint_dir(workdir)}"
    print(summary)
    return 0


def _info(args: argparse.Namespace) -> int:
    import jax

    import configs
    import kernels
    from arch import registry

    print("mixers:")
    for name in registry.mixer_names():
        print(f"  {name:<16} {registry.get_spec(name).description}")
    print("kernels:")
    for op, implementations in kernels.available_ops().items():
        default = kernels.default_implementation(op)
        listed = ", ".join(f"{impl}*" if impl == default else impl for impl in implementations)
        print(f"  {op:<16} {listed}")
    print(f"  (* default on the {jax.default_backend()} backend)")
    print("presets:")
    print("  " + ", ".join(configs.preset_names()))
    print(f"devices ({jax.device_count()} on {jax.process_count()} process(es)):")
    for device in jax.devices():
        print(f"  {device.id}: {device.device_kind} ({device.platform})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from arch.config import ConfigError
    from train import data as data_lib
    from train.checkpoint import load_model

    model, cfg, step = load_model(args.checkpoint, args.step)
    tokenizer = data_lib.make_tokenizer(cfg.data)
    prompt = tokenizer.encode(args.prompt)
    if prompt.size == 0:
        raise ConfigError("--prompt: empty prompt; give at least one character")
    room = cfg.model.max_seq_len - args.max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens: {args.max_new_tokens} leaves no room for a prompt within "
            f"model.max_seq_len={cfg.model.max_seq_len}"
        )
    prompt = prompt[-room:]  # keep the end of a long prompt
    new_tokens = model.generate(
        np.asarray(prompt, np.int32)[None],
        args.max_new_tokens,
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(args.prompt + tokenizer.decode(np.asarray(new_tokens[0])))
    print(f"[{cfg.name}, step {step}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo", description="A zoo of long-sequence language models with memory.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="pretrain a model (default: the tiny preset on the embedded corpus)")
    train.add_argument("--config", help=f"preset name or path to a .py file with get_config() (default: {DEFAULT_PRESET})")
    train.add_argument("--workdir", help="run directory for checkpoints and metrics (default: runs/NAME-TIME)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field, e.g. model.d_model=512")
    train.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    train.set_defaults(run=_train)

    info = commands.add_parser("info", help="list mixers, kernels with their implementations, presets and devices")
    info.set_defaults(run=_info)

    generate = commands.add_parser("generate", help="generate text from a checkpoint")
    generate.add_argument("--checkpoint", required=True, help="a run's workdir (or its checkpoints folder)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    generate.set_defaults(run=_generate)

    from train.plugins import load_plugins

    for plugin in load_plugins():  # e.g. eval adds `bench` and `eval`
        if hasattr(plugin, "add_commands"):
            plugin.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from arch.config import ConfigError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"memzoo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
