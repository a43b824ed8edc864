"""kdfast's benchmark suite: ``python -m benchmarks.run --suite quick|full|cpu-core|gpu-core|fused-linear``.

Modules: ``problems`` (inputs, the float64 reference, bytes and FLOPs), ``peers`` (the loss
implementations that are timed: kdfast's backends and the peers), ``measure`` (timing, memory,
bandwidth and correctness on CPU and GPU), ``suites`` (the named configurations and their bars),
``report`` (derived metrics, JSON, Markdown, plots, RESULTS.md) and ``run`` (the command line).
"""
