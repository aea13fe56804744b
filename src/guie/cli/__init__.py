"""The `guie` command: a thin typer layer over the library (every command is a library call).

One module per command group registers its commands on `app`: embed, evaluate, train, recipes, data, export,
search, demo.
Command modules import the library inside each command, so `guie --help` does not import torch.
"""
from __future__ import annotations

import logging
import sys

import typer

from . import data, demo, embed, evaluate, export, recipes, search, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    app()


if __name__ == "__main__":
    main()
