"""Run `guie ARGS` in this process and kill it (SIGKILL, as `kill -9`) at a chosen point, for crash-safety tests:

    KILL_AT_PATH=<file>       when the image decoder reaches that file
    KILL_AFTER_PARTS=<n>      right after the n-th embedding part of this process is written

Usage: python tests/kill_points.py embed SRC -o OUT ...
"""
from __future__ import annotations

import os
import signal
import sys


def _install() -> None:
    at_path, after_parts = os.environ.get("KILL_AT_PATH"), os.environ.get("KILL_AFTER_PARTS")
    if at_path:
        import guie.pipeline.datasets as datasets

        load = datasets.transform_file

        def killing_load(transform, path, *a, **kw):
            if str(path) == at_path:
                os.kill(os.getpid(), signal.SIGKILL)
            return load(transform, path, *a, **kw)

        datasets.transform_file = killing_load
    if after_parts:
        from guie.embedding.files import EmbeddingParts

        write, written = EmbeddingParts.write_part, [0]

        def killing_write(self, *a, **kw):
            write(self, *a, **kw)
            written[0] += 1
            if written[0] >= int(after_parts):
                os.kill(os.getpid(), signal.SIGKILL)

        EmbeddingParts.write_part = killing_write


if __name__ == "__main__":
    _install()
    from guie.cli import main

    sys.argv = ["guie", *sys.argv[1:]]
    main()
