"""Configs and the command line: presets, overrides, and one-line errors that name the field."""

import pathlib
import subprocess
import sys

import pytest

import configs
from arch.config import ConfigError
from train.cli import main
from train.config import TrainConfig, apply_overrides, config_from_dict, load_config


@pytest.mark.parametrize("name", configs.preset_names())
def test_every_preset_builds_and_round_trips_through_its_saved_form(name):
    cfg = load_config(name)
    assert isinstance(cfg, TrainConfig)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(
        load_config("tiny"),
        [
            "model.d_model=64",
            "optimizer.lr=1e-3",
            "logging.tensorboard=false",
            "model.layers=sliding_window,attention",
            "model.mixer_options.sliding_window.size=32",
            "data.paths=/tmp/*.txt",
        ],
    )
    assert cfg.model.d_model == 64 and cfg.optimizer.lr == 1e-3 and cfg.logging.tensorboard is False
    assert cfg.model.layers == ("sliding_window", "attention")
    assert cfg.model.mixer_options["sliding_window"]["size"] == 32
    assert cfg.data.paths == "/tmp/*.txt"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=64", "unknown field 'd_modle'"),
        ("model.d_model=big", "expected an integer"),
        ("model.d_model=-4", "model.d_model"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("data.source=nowhere", "data.source"),
        ("data.seq_len=4096", "data.seq_len"),
        ("model.vocab_size=100", "model.vocab_size"),
        ("model.layers=attention,mamba", "unknown mixer 'mamba'"),
        ("remat=sometimes", "remat"),
        ("steps", "expected FIELD=VALUE"),
    ],
)
def test_bad_overrides_fail_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("tiny"), [override])


def test_a_dotted_size_names_its_preset():
    assert load_config("based-1.3b") == load_config("based-1-3b")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("tinyy")


def test_config_file_path_is_loaded(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from configs.tiny import get_config as tiny\n"
        "def get_config():\n    return tiny().replace(name='mine', steps=3)\n"
    )
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.steps == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "model.n_heads=3"], "model.n_heads"),
        (["train", "--config", "nope"], "unknown preset 'nope'"),
        (["train", "--resume"], "--resume needs --workdir"),
        (["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"], "holds no checkpoints"),
    ],
)
def test_cli_errors_are_one_line_naming_the_problem(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memzoo: error:") and message in err and "\n" not in err


def test_console_script_runs_info():
    out = subprocess.run(
        [sys.executable, "-c", "from train.cli import main; raise SystemExit(main(['info']))"],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parents[2],
        check=True,
    ).stdout
    assert "attention" in out and "sliding_window" in out and "xla" in out and "tiny" in out


def test_cli_trains_resumes_and_generates(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"print('hello {i}')\n" * 40)
    workdir = str(tmp_path / "run")
    small = [
        f"data.paths={corpus}/*.txt",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.eval_fraction=0.2",
        "model.d_model=32",
        "model.n_layers=1",
        "model.max_seq_len=64",
        "logging.progress_bar=false",
        "logging.eval_every=0",
        "checkpoint.every_steps=2",
    ]
    args = ["train", "--workdir", workdir] + [item for pair in small for item in ("--set", pair)]
    assert main(args + ["--set", "steps=2"]) == 0
    assert "unigram entropy" in capsys.readouterr().out
    assert main(["train", "--workdir", workdir, "--resume", "--set", "steps=4"]) == 0
    assert "stopped at step 4" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", workdir, "--prompt", "print(", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("print(") and "step 4" in captured.err
