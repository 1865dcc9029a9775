"""Recall and needle benchmarks: synthetic tasks, the MQAR protocol, checkpoint scoring and reports."""
