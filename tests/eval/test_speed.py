"""The model speed benchmark measures what it reports: flat state for recurrent mixers, a growing KV cache."""

from eval.speed import format_table, measure


def test_speed_rows_report_throughput_and_the_decode_state():
    kwargs = dict(batch=1, chunk=32, decode_tokens=4, repeats=1)
    based_short, based_long = (measure("based-tiny", length, **kwargs) for length in (64, 160))
    attention_short, attention_long = (measure("tiny", length, **kwargs) for length in (32, 96))
    assert based_short["state_bytes"] == based_long["state_bytes"]
    assert attention_long["state_bytes"] == 3 * attention_short["state_bytes"]
    for row in (based_short, based_long, attention_short, attention_long):
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    table = format_table([based_short, based_long])
    assert "based-tiny" in table and "decode tok/s" in table
