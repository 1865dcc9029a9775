"""Titans MAC at the paper's 340M setting (see configs/_titans.py for the numbers and why)."""

from configs._titans import paper_config


def get_config():
    return paper_config("mac", "340m")
