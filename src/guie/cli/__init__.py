"""The `guie` command: a thin typer layer over the library (every command is a library call).

One module per command group registers its commands on `app`: embed, evaluate, train, recipes, data, export,
search, demo.
Command modules import the library inside each command, so `guie --help` does not import torch.

The one error boundary is `_GuieGroup.invoke`: a `guie.errors.GuieError` from any command becomes a one-line red
`error: ...` on stderr with the error's exit code (2 for bad input); any other exception is a bug and keeps its
traceback (exit 1). `GUIE_DEBUG=1` prints the traceback of a `GuieError` too.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

import typer
from typer.core import TyperGroup

from . import data, demo, embed, evaluate, export, recipes, search, train


class _GuieGroup(TyperGroup):
    """The root command group; its `invoke` is the CLI's one error boundary."""

    def invoke(self, ctx):
        from ..errors import GuieError

        try:
            return super().invoke(ctx)
        except GuieError as e:
            if os.environ.get("GUIE_DEBUG"):
                traceback.print_exc()
            colour = "red" if e.exit_code == 2 else "yellow"
            typer.secho(f"error: {e}" if e.exit_code == 2 else str(e), fg=colour, err=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(cls=_GuieGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="guie: universal image embeddings (<= 64-d): embed, evaluate with the exact GUIE mP@5, "
                       "train, export, search.")

for _group in (embed, evaluate, train, recipes, data, demo, export, search):
    _group.register(app)


def main() -> None:
    """Entry point of the `guie` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs which SIMD build it picked
    from ..runtime import tune_cpu_allocator

    tune_cpu_allocator()  # before any thread allocates: the arena limit binds only threads that start later
    try:
        app()
    except SystemExit as e:
        _exit_fast(e.code)
        raise
    _exit_fast(0)


def _exit_fast(code) -> None:
    """End the process once the command is done: Python's exit handlers run (logging, temporary files), then the
    process exits without the interpreter's teardown (a garbage collection of every module) and the C++ static
    destructors of torch and OpenVINO. Those touch pages of the native libraries that a run never used: `guie embed`
    grew by 100-170 MB of RSS and lost 1-20 s after its work was done (docs/cpu-runtime.md). Threads that are not
    daemons are waited for first, as the interpreter would. GUIE_FAST_EXIT=0: the ordinary exit (returns)."""
    import atexit
    import threading

    shutdown_threads = getattr(threading, "_shutdown", None)  # what the interpreter's exit calls first
    if os.environ.get("GUIE_FAST_EXIT", "1") == "0" or shutdown_threads is None:
        return
    shutdown_threads()  # waits for threads that are not daemons; idle thread pools end
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
