"""Benchmarks of the studio and their report: speed, memory, quality, efficiency.

``python -m bench`` runs them all (``--full`` for longer runs, ``--only NAME`` for one) and
writes ``bench/results/*.json`` and ``bench/results/REPORT.md``. These are measurements,
not tests: ``tests/test_bench.py`` only checks that the code paths run.
"""
