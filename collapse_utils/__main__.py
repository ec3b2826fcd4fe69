"""``python -m collapse_utils run --profile smoke|full [--only IDS] [--jobs N] [--no-build]``."""

from __future__ import annotations

import argparse
import sys

from collapse_utils.book.runner import RunnerError, run_book
from collapse_utils.config import ConfigError, available_profiles


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collapse_utils")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="execute every notebook × configuration with papermill, then build the book",
        description="Execute the notebooks into book/executed/ (skipping up-to-date ones), "
        "write _toc.yml and build the book into _build/html. Exits non-zero if any "
        "execution or the book build failed.",
    )
    r.add_argument("--profile", required=True, choices=available_profiles())
    r.add_argument(
        "--only",
        nargs="+",
        metavar="ID",
        help="run only these experiment ids (comma or space separated) and their families' "
        "summaries; other pages stay as they are",
    )
    r.add_argument("--jobs", type=_positive, default=1, help="parallel executions (default 1)")
    r.add_argument("--no-build", action="store_true", help="execute and write the toc only")
    r.add_argument("--force", action="store_true", help="re-execute even up-to-date notebooks")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    only = [i for item in args.only or [] for i in item.split(",") if i]
    try:
        report = run_book(
            args.profile,
            only=only or None,
            jobs=args.jobs,
            build=not args.no_build,
            force=args.force,
        )
    except (RunnerError, ConfigError) as err:
        p.error(str(err))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
