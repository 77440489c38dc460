"""`python -m llaca.bench NAME [options]` (see `python -m llaca.bench NAME --help`)."""
from __future__ import annotations

import importlib
import sys

# benchmark name -> module in llaca.bench whose main(argv) runs it
BENCHMARKS = {
    "quality": "quality", "speed": "speed", "load": "load", "heldout": "heldout", "corrections": "corrections",
    "grouping": "grouping", "formats": "formats", "demo": "demo", "small": "small", "memory": "memory",
}
USAGE = (f"usage: python -m llaca.bench {{{','.join(BENCHMARKS)}}} [options]   (python -m llaca.bench quality --help)\n"
         "one-off studies (regimes, grounding, basecost, overhead, contention): python -m experiments.NAME")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    which, rest = argv[0], argv[1:]
    if which not in BENCHMARKS:
        print(f"error: unknown benchmark {which!r}\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(f".{BENCHMARKS[which]}", __package__).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
