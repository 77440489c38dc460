"""One-off studies, out of the product tree: each answered one question once, and its results stay where it wrote
them (`bench_results/<name>/`). Run one with `python -m experiments.<name> --help` from the repository root."""
