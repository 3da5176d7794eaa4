"""The library behind the command-line tools in scripts/: benchmarks, sweeps, the chaos test.

Each `scripts/NAME.py` is a thin command line over a module here (as timm's benchmark.py over
its library); every tool builds its runs with `lambdanet.experiment.create_experiment` or by
launching `lambdanet-train`, and takes the same `--config` and `--config.FIELD=VALUE` flags
(`lambdanet.command_line`).
"""
