"""Titans LMM, a tiny CPU preset that trains in a few minutes on the embedded corpus."""

from configs._titans import tiny_config


def get_config():
    return tiny_config("lmm")
