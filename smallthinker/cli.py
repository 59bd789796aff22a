"""The `smallthinker` command: one entry point for every job of the toolkit.

    smallthinker demo                       # the whole pipeline, offline, on a tiny model
    smallthinker pretrain --config pretrain_tiny
    smallthinker sft --config sft_tiny
    smallthinker merge --inputs A B --weights 0.5 0.5 --out MERGED
    smallthinker chat --model MERGED --prompt "..."
    smallthinker evaluate --suite mmlu --model CKPT --data DIR
    smallthinker convert-store --src CKPT --dst STORE
    smallthinker plot RUN_DIR
    smallthinker kv-report --preset smallthinker-21b

Mistakes (a bad override, missing data, a damaged or foreign checkpoint, a budget too small ...) print one
line starting with `error:` and exit with status 2; `--debug` (or SMALLTHINKER_DEBUG=1) shows the traceback.
Modules are imported by the subcommand that needs them, so `--help` and errors come back at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from smallthinker import commands

USAGE_ERROR = 2
DEBUG_ENV = "SMALLTHINKER_DEBUG"


def build_parser(prog: str = "smallthinker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in commands.COMMANDS:
        child = sub.add_parser(
            spec.name,
            help=spec.summary,
            description=spec.description,
            epilog=spec.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: an unset subcommand flag must not reset `smallthinker --debug COMMAND` to False.
        child.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help=f"show tracebacks (also: {DEBUG_ENV}=1)",
        )
        spec.add_arguments(child)
        child.set_defaults(run=spec.run, spec=spec)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """The project's own error types and the OS errors a user's input causes, from the modules loaded.

    Looking them up lazily keeps `smallthinker --help` from importing torch, lm-eval and transformers.
    """
    names = {
        "smallthinker.integrity": ("CheckpointFileError",),
        "smallthinker.commands": ("UsageError",),
        "smallthinker.train.config": ("ConfigError",),
        "smallthinker.train.checkpoint": ("CheckpointError",),
        "smallthinker.train.loop": ("TrainingDivergedError",),
        "smallthinker.eval.data": ("EvalError",),
        "smallthinker.inference.store": ("StoreError",),
        "smallthinker.inference.engine": ("MemoryBudgetError",),
        "smallthinker.inference.io": ("ExpertReadError",),
        "safetensors": ("SafetensorError",),
    }
    found: list[type[BaseException]] = [OSError, ValueError]  # files, disk, and the validators' ValueErrors
    for module_name, classes in names.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, c) for c in classes if module is not None and hasattr(module, c)]
    return tuple(found)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{text} ({err.filename})"
    return text or type(err).__name__


def run_guarded(run: Callable[[], int | None], debug: bool, prog: str) -> int:
    """Run a subcommand; user errors become one `error:` line and status 2, Ctrl-C status 130."""
    try:
        return run() or 0
    except KeyboardInterrupt as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as err:
        if debug or not isinstance(err, user_error_types()):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Known options, plus `--section.field=value` overrides for the commands that take them."""
    args, extra = parser.parse_known_args(argv)
    if extra and not args.spec.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    # The words after the command, to print the command line that resumes an interrupted run.
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else argv
    return args


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or default_prog()
    parser = build_parser(prog)
    args = parse(parser, argv)
    args.prog = f"{prog} {args.command}"
    args.invocation = [*prog.split(), args.command]
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    commands.quiet_libraries(getattr(args, "verbose", False), args.spec.progress_bars)
    return run_guarded(lambda: args.run(args), debug, args.prog)


def default_prog() -> str:
    """How the user started us: the console script, or `python -m smallthinker` without it on PATH."""
    started_as_module = Path(sys.argv[0]).resolve() == Path(__file__).with_name("__main__.py").resolve()
    return "python -m smallthinker" if started_as_module else "smallthinker"


def alias(command: str) -> None:
    """`python -m scripts.NAME ARGS` = `smallthinker COMMAND ARGS` (kept for existing scripts and docs)."""
    sys.exit(main([command, *sys.argv[1:]]))


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
