"""Benchmarks: does LLaCA learn without forgetting (`quality`), and what does it cost (`speed`)?

    python -m llaca.bench quality [--quick]     # CoIN-mini, every method, 3 seeds -> bench_results/quality/
    python -m llaca.bench speed                 # step / stage / memory / chat ratios -> bench_results/speed.*

Both run on the user's tiny `base` version (`ensure_base(base="tiny")` of `$LLACA_HOME`) and only through the library's public
pieces (`run_stage`, `load_version`, `evaluate`, `cl_metrics`, `stream_answer`), so they measure what the app runs.
"""
