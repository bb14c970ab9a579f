"""Benchmarks of gpubuffers: ``python -m bench`` (see ``python -m bench --help``)."""
