"""`python -m llaca.bench quality|speed [options]` (see `--help` of each)."""
from __future__ import annotations

import sys

USAGE = "usage: python -m llaca.bench {quality,regimes,speed,load} [options]   (python -m llaca.bench quality --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    which, rest = argv[0], argv[1:]
    if which == "quality":
        from .quality import main as run
    elif which == "speed":
        from .speed import main as run
    elif which == "regimes":
        from .regimes import main as run
    elif which == "load":
        from .load import main as run
    else:
        print(f"error: unknown benchmark {which!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
