"""Command-line tools (benchmarks, sweeps, conversion, data tools); importable for tests."""
