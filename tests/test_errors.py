"""The CLI's one error boundary (`guie.cli._GuieGroup.invoke`), in real `guie` processes: an error raised on purpose
(a `GuieError`) is one line and exit 2; anything else is a bug and keeps its traceback (exit 1); GUIE_DEBUG=1 shows
the traceback of a GuieError too."""
from __future__ import annotations

import os
import subprocess
import sys

BUG = """
import sys
import guie.data.manifest as manifest

def read_manifest(*args, **kwargs):
    raise RuntimeError("a bug in guie")

manifest.read_manifest = read_manifest   # the command imports it when it runs
sys.argv = ["guie", "embed", sys.argv[1], "--out", sys.argv[2]]
from guie.cli import main
main()
"""


def guie(*args, env=None):
    return subprocess.run([sys.executable, "-m", "guie.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_guie_error_is_one_line_naming_the_input_and_exit_2(tmp_path):
    r = guie("embed", tmp_path / "no-such-folder", "--out", tmp_path / "e.parquet")
    assert r.returncode == 2, r.stderr
    assert _lines(r.stderr) == [_lines(r.stderr)[0]] and r.stderr.startswith("error: "), r.stderr
    assert str(tmp_path / "no-such-folder") in r.stderr and "Traceback" not in r.stderr


def test_any_other_exception_is_a_bug_with_its_traceback_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-c", BUG, str(tmp_path), str(tmp_path / "e.parquet")], capture_output=True,
                       text=True)
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: a bug in guie" in r.stderr
    assert "error: " not in r.stderr


def test_guie_debug_shows_the_traceback_of_a_guie_error(tmp_path):
    r = guie("embed", tmp_path / "no-such-folder", "--out", tmp_path / "e.parquet", env={"GUIE_DEBUG": "1"})
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr and "ManifestError" in r.stderr
    assert _lines(r.stderr)[-1].startswith("error: ")


def test_data_emoji_without_npm_ends_in_one_line(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    r = guie("data", "emoji", "--cache", tmp_path / "cache", env={"PATH": str(empty_bin)})
    assert r.returncode == 2, r.stderr
    assert _lines(r.stderr) == ["error: the emoji benchmark needs the `npm` client to fetch its images "
                                "(apt-get install npm)"]
