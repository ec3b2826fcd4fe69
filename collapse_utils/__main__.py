"""``python -m collapse_utils run --profile smoke|full [--only ID …] [--jobs N] [--seeds S …]
[--gpus auto|N|ID …] [--runs-per-gpu K] [--ray [ADDRESS]] [--no-build]`` (every list flag takes
its items with spaces, commas or both);
``python -m collapse_utils doctor --profile full [--jobs N] [--allow-cpu]`` (preflight, see
doctor.py); ``python -m collapse_utils rehearse [--only IDS] [--no-build]`` (the full profile's
code path on full-size fixtures, see rehearsal.py)."""

from __future__ import annotations

import argparse
import sys

from collapse_utils.config import ConfigError, available_profiles


class ListOption(argparse.Action):
    """A list flag, one syntax for all: ``--x a b``, ``--x a,b`` and ``--x a,b c`` give the same
    items (one trailing comma is allowed: ``--gpus 3,`` is device 3); an empty item
    (``--x ""``, ``--x a,,b``) is a usage error. ``const`` parses the items, joined by commas,
    into the option's value (default: the list of items), raising ``ValueError`` with the
    reason."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parts = [value.strip() for value in values]
        text = ",".join(p.removesuffix(",") for p in parts) + ("," if parts[-1][-1:] == "," else "")
        if not all(item.strip() for item in text.removesuffix(",").split(",")):
            parser.error(f"argument {option_string}: an empty item in {' '.join(values)!r}")
        try:
            value = self.const(text) if self.const else text.removesuffix(",").split(",")
        except ValueError as err:
            parser.error(f"argument {option_string}: {err}")
        setattr(namespace, self.dest, value)


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
    _execution_options(r)
    again = r.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="re-execute even up-to-date notebooks")
    again.add_argument(
        "--stale",
        action="store_true",
        help="train again the complete runs that other training or measurement code made (their "
        "run pages say so) and re-execute their pages and the pages that read them",
    )
    r.add_argument(
        "--seeds",
        action=ListOption,
        const=_seeds,
        metavar="S",
        help="run every configuration with these seeds instead of its own (params seeds:)",
    )
    r.add_argument(
        "--gpus",
        action=ListOption,
        const=_gpus,
        metavar="auto|N|ID",
        help="one training page per GPU at a time, each kernel seeing only its GPU: every "
        "visible GPU (auto), the first N, or these device ids; --jobs pages at a time for the "
        "rest, and for everything where auto finds no GPU",
    )
    r.add_argument(
        "--runs-per-gpu",
        type=_positive,
        default=1,
        metavar="K",
        help="training pages sharing each GPU at once (with --gpus, or --ray: num_gpus=1/K); "
        "the runner checks each GPU's free memory first",
    )
    r.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run every notebook as a Ray task (training pages with num_gpus=1) on a new local "
        "Ray instance, or on the cluster at ADDRESS (auto: the one `ray start` or RAY_ADDRESS "
        "names); outputs/ and book/executed/ must be on a filesystem every node shares",
    )
    h = sub.add_parser(
        "rehearse",
        help="build full-size fixtures, check them with doctor, then run the rehearsal book",
        description="Write a random full-size ViT-B/32 with the real CLIP tokenizer and fake "
        "datasets in the real formats where params/profiles/rehearsal.yaml points, run doctor "
        "on that profile (CPU allowed) and execute its book: the full profile's code path for a "
        "few steps per configuration.",
    )
    _execution_options(h)
    d = sub.add_parser(
        "doctor",
        help="check, without training, that this machine can run a profile",
        description="Check model files, datasets, GPU, disk space and writable outputs for every "
        "experiment of the profile and estimate the study's time from the benchmark. One line "
        "per check; exits non-zero if any line is marked FIX.",
    )
    d.add_argument("--profile", required=True, choices=available_profiles())
    d.add_argument(
        "--jobs", type=_positive, default=1, help="runs trained at once (resume files on disk)"
    )
    d.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without a GPU, let train.device auto train on CPU (a rehearsal, CI)",
    )
    return p


def _execution_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        action=ListOption,
        metavar="ID",
        help="run only these experiment ids and their families' "
        "summaries; other pages stay as they are",
    )
    p.add_argument("--jobs", type=_positive, help="parallel executions (default 1)")
    p.add_argument("--no-build", action="store_true", help="execute and write the toc only")


def _gpus(text: str) -> str | tuple[str, ...]:
    from collapse_utils.book.dispatch import parse_gpus

    return parse_gpus(text)


def _check_dispatch(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--ray schedules by the cluster's resources: --jobs and --gpus have no meaning there."""
    if getattr(args, "ray", None) is not None:
        for option in ("jobs", "gpus"):
            if getattr(args, option) is not None:
                p.error(
                    f"argument --ray: not allowed with --{option} (Ray runs as many notebooks "
                    "as the cluster has CPUs and GPUs; declare them with `ray start`)"
                )
    if getattr(args, "runs_per_gpu", 1) > 1 and args.gpus is None and args.ray is None:
        p.error("argument --runs-per-gpu: needs --gpus or --ray (the GPUs it packs runs on)")
    args.jobs = args.jobs or 1


def _seeds(text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.removesuffix(",").split(",")]
    if not all(item.isdigit() for item in items) or len(set(items)) < len(items):
        raise ValueError(f"must be distinct integers >= 0, got {text!r}")
    return tuple(int(item) for item in items)


def doctor(profile: str, jobs: int, allow_cpu: bool = False) -> int:
    from collapse_utils import config
    from collapse_utils.doctor import problems, report, run_doctor

    checks = run_doctor(profile, config.PARAMS_DIR, jobs=jobs, allow_cpu=allow_cpu)
    print(report(checks))
    return 1 if problems(checks) else 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command != "doctor":
        _check_dispatch(p, args)
    if args.command == "doctor":
        try:
            return doctor(args.profile, args.jobs, args.allow_cpu)
        except ConfigError as err:
            p.error(str(err))
    # Imported here: the runner imports torch, which `doctor` on a CPU profile never needs.
    from collapse_utils.book.dispatch import DispatchError
    from collapse_utils.book.runner import STALE, RunnerError, run_book
    from collapse_utils.rehearsal import RehearsalError, rehearse
    from collapse_utils.storage import LockedError

    try:
        if args.command == "rehearse":
            check = lambda: doctor("rehearsal", args.jobs, allow_cpu=True)  # noqa: E731
            report = rehearse(only=args.only, jobs=args.jobs, build=not args.no_build, check=check)
        else:
            report = run_book(args.profile, only=args.only, jobs=args.jobs, build=not args.no_build,
                              force=STALE if args.stale else args.force, seeds=args.seeds,
                              gpus=args.gpus, ray=args.ray,
                              runs_per_gpu=args.runs_per_gpu)  # fmt: skip
    except (RunnerError, ConfigError, LockedError, RehearsalError, DispatchError) as err:
        p.error(str(err))
    return 0 if report is not None and report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
