"""The op registry: default implementation per backend, dispatch and its errors."""

import jax
import pytest

import kernels
from kernels import _backend


@pytest.fixture
def empty_registry(monkeypatch):
    monkeypatch.setattr(_backend, "_registry", {})


def _fake_backend(monkeypatch, name):
    monkeypatch.setattr(_backend.jax, "default_backend", lambda: name)


def test_cpu_defaults_to_xla_and_interprets_pallas():
    assert jax.default_backend() == "cpu"
    assert _backend.interpret_mode()
    assert kernels.default_implementation("attention") == "xla"
    assert kernels.default_implementation("attention_decode") == "xla"


def test_available_ops_lists_attention():
    ops = kernels.available_ops()
    assert ops["attention"] == ["reference", "xla", "pallas"]
    assert ops["attention_decode"] == ["reference", "xla", "pallas"]


def test_accelerators_prefer_pallas_when_an_op_has_it(empty_registry, monkeypatch):
    _backend.register_op("with_pallas", {"xla": len, "pallas": max})
    _backend.register_op("without_pallas", {"reference": min, "xla": len})
    for accelerator in ("tpu", "gpu"):
        _fake_backend(monkeypatch, accelerator)
        assert not _backend.interpret_mode()
        assert _backend.dispatch("with_pallas") is max
        assert _backend.dispatch("without_pallas") is len
    _fake_backend(monkeypatch, "cpu")
    assert _backend.dispatch("with_pallas") is len
    assert _backend.dispatch("with_pallas", "pallas") is max


def test_dispatch_errors_name_the_op_and_what_exists(empty_registry):
    _backend.register_op("toy", {"reference": min, "xla": len})
    assert _backend.dispatch("toy", "reference") is min
    with pytest.raises(ValueError, match=r"toy: has no 'pallas' implementation; available: \['reference', 'xla'\]"):
        _backend.dispatch("toy", "pallas")
    with pytest.raises(ValueError, match=r"toy: got unknown implementation 'cuda'"):
        _backend.dispatch("toy", "cuda")
    with pytest.raises(ValueError, match=r"unknown op 'nope'; registered ops: \['toy'\]"):
        _backend.dispatch("nope")


def test_register_op_rejects_unknown_implementation_names(empty_registry):
    with pytest.raises(ValueError, match=r"unknown implementation name\(s\) \['triton'\]"):
        _backend.register_op("toy", {"triton": len})
    with pytest.raises(ValueError, match="at least one implementation"):
        _backend.register_op("toy", {})
