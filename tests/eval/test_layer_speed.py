"""eval.layer_speed: per-length worker processes, the table, option parsing."""

import argparse

import pytest

from eval import layer_speed


def test_table_has_a_row_per_length_with_ratios_to_the_first(capsys):
    layer_speed.main(
        ["--mixer", "linear_attention", "--d-model", "16", "--heads", "2", "--batch", "1",
         "--lengths", "16,32", "--repeats", "1", "--option", "feature_map='identity'"]
    )
    out = capsys.readouterr().out
    assert "linear_attention (feature_map=identity)" in out
    rows = [line for line in out.splitlines() if line.startswith("| 16 ") or line.startswith("| 32 ")]
    assert len(rows) == 2
    first = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert first[-2:] == ["1.00", "1.00"]
    assert float(first[3].replace(",", "")) > 0  # peak RSS in MiB


def test_measure_reports_tokens_per_second_of_the_whole_batch():
    row = layer_speed.measure("linear_attention", {}, d_model=16, heads=2, batch=3, length=8, repeats=1)
    assert row["tokens_per_s"] == pytest.approx(3 * 8 / row["seconds_per_step"])


def test_options_are_parsed_as_literals_and_rejected_without_a_value():
    assert layer_speed._parse_option("chunk_size=64") == ("chunk_size", 64)
    assert layer_speed._parse_option("feature_map=elu1") == ("feature_map", "elu1")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        layer_speed._parse_option("chunk_size")


def test_a_failing_worker_names_the_length():
    with pytest.raises(SystemExit, match="length 16"):
        layer_speed.main(["--mixer", "no_such_mixer", "--lengths", "16", "--repeats", "1"])
