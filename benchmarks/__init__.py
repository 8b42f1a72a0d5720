"""Benchmarks, run from the repository root as ``python -m benchmarks.<name>`` (see README.md).

A package so that the benchmarks and the tests share one harness (``benchmarks.harness``) without
``sys.path`` edits. Importing it imports nothing: the GPU check runs where the web stack is absent.
"""
