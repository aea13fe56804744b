"""Hostile-input corpus of the index commands: model files that are not models, a deleted model file, a manifest with
an empty path, a grid into a missing folder, a stray 2 GiB file among the images, impossible geometry (issue 26,
items 14-17). Each gives one line naming the input (exit 2), or, for the stray file, a report in bounded memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from guie.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r, *names) -> str:
    """The command failed with exit 2 and one line `error: ...` naming each of `names` (no traceback)."""
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.output)
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """name -> a file given as --model: a good checkpoint and every kind of bad one."""
    import faiss
    import torch

    from guie.models import create_embedder, save_embedder

    d = tmp_path_factory.mktemp("models")
    tiny = create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32).eval()
    good = save_embedder(tiny, d / "good.pt")
    payload = torch.load(good, weights_only=False)
    (d / "text.pt").write_text("these are not weights\n")
    (d / "empty.pt").write_bytes(b"")
    wider = create_embedder("timm:test_efficientnet", embed_dim=16, pretrained=False, image_size=32)
    torch.save({**payload, "state_dict": wider.state_dict()}, d / "other_architecture.pt")
    torch.save({**payload, "state_dict": {k: v for k, v in payload["state_dict"].items() if not k.startswith("head")}},
               d / "missing_keys.pt")
    faiss.write_index(faiss.IndexFlatL2(8), str(d / "an_index.faiss"))
    (d / "a_folder.pt").mkdir()
    return {p.stem: p for p in d.iterdir()} | {"missing": d / "no_such_model.pt"}


BAD_MODELS = {"text": "not a guie model checkpoint", "empty": "empty file", "other_architecture": "of another shape",
              "missing_keys": "missing", "an_index": "not a guie model checkpoint", "missing": "file not found",
              "a_folder": "a folder"}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_a_bad_model_file_is_one_line_naming_it(tmp_path, model_files, kind):
    model = model_files[kind]
    line = one_error_line(run("index", "create", tmp_path / "idx", "--model", model), model)
    assert BAD_MODELS[kind] in line
    assert not (tmp_path / "idx" / "index.sqlite").exists()


def test_every_model_command_shares_the_loader(tmp_path, model_files, labelled_folder):
    """The loader gives the message, so `guie embed` says the same as `guie index create`."""
    missing = model_files["missing"]
    line = one_error_line(run("embed", labelled_folder, "--model", missing, "--out", tmp_path / "e.parquet"), missing)
    assert "file not found" in line


def test_an_index_whose_model_file_was_deleted(tmp_path, model_files, labelled_folder):
    import shutil

    model = tmp_path / "model.pt"
    shutil.copy(model_files["good"], model)
    assert run("index", "create", tmp_path / "idx", "--model", model).exit_code == 0
    model.unlink()
    query = next(labelled_folder.rglob("*.png"))
    for args in (["add", tmp_path / "idx", labelled_folder, "--no-progress"], ["search", tmp_path / "idx", query]):
        line = one_error_line(run("index", *args), model.resolve())
        assert "file not found" in line and "'idx'" in line


@pytest.mark.parametrize("size", ["0", "-3", "7"])
def test_impossible_geometry_is_refused(tmp_path, model_files, size):
    line = one_error_line(run("index", "create", tmp_path / "idx", "--model", model_files["good"], "--image-size",
                              size), size)
    assert "image_size" in line and not (tmp_path / "idx" / "index.sqlite").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_manifest_with_an_empty_path_cell(tmp_path, model_files, labelled_folder, suffix):
    paths = [str(p) for p in sorted(labelled_folder.rglob("*.png"))[:3]]
    manifest = tmp_path / f"m{suffix}"
    df = pd.DataFrame({"path": [paths[0], None, paths[2]], "label": ["a", "b", "c"]})
    df.to_csv(manifest, index=False) if suffix == ".csv" else df.to_parquet(manifest)
    assert run("index", "create", tmp_path / "idx", "--model", model_files["good"]).exit_code == 0
    line = one_error_line(run("index", "add", tmp_path / "idx", manifest, "--no-progress"), manifest)
    assert "empty 'path'" in line and "row 2" in line


def test_a_grid_into_a_missing_folder_is_written(tmp_path, model_files, labelled_folder):
    assert run("index", "create", tmp_path / "idx", "--model", model_files["good"]).exit_code == 0
    assert run("index", "add", tmp_path / "idx", labelled_folder, "--no-progress").exit_code == 0
    query = next(labelled_folder.rglob("*.png"))
    grid = tmp_path / "not" / "yet" / "there" / "grid.png"
    r = run("index", "search", tmp_path / "idx", query, "--grid", grid)
    assert r.exit_code == 0 and grid.stat().st_size > 1000, r.output
    one_error_line(run("index", "search", tmp_path / "idx", query, "--grid", tmp_path / "grid.nope"), "grid.nope")


HASH_IN_A_LIGHT_PROCESS = textwrap.dedent("""
    import resource, sys
    from guie.data.dedup import file_digests
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    digests = file_digests(sys.argv[1:], workers=1, images_only=True)
    print([d is not None for d in digests], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_a_stray_huge_file_costs_no_memory(tmp_path, model_files, labelled_folder):
    """A 2 GiB sparse non-image named .png is refused by its header without being read; a real PNG padded to
    512 MiB is hashed in chunks: the hashing process grows by < 64 MB (whole-file reads grew it by the file's size).
    `guie index add` reports the stray file with the reason and adds the rest."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    small = sorted(labelled_folder.rglob("*.png"))[:2]
    for p in small:
        (folder / p.name).write_bytes(p.read_bytes())
    stray, padded = folder / "stray.png", folder / "padded.png"
    stray.touch()
    os.truncate(stray, 2 << 30)
    padded.write_bytes(small[0].read_bytes())  # a valid PNG followed by 512 MiB of zeros (ignored after IEND)
    os.truncate(padded, 512 << 20)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", HASH_IN_A_LIGHT_PROCESS, str(stray), str(padded), str(small[0])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    found, grown_mb = r.stdout.strip().rsplit(" ", 1)
    assert found == "[False, True, True]" and int(grown_mb) < 64, r.stdout

    assert run("index", "create", tmp_path / "idx", "--model", model_files["good"]).exit_code == 0
    r = run("index", "add", tmp_path / "idx", folder, "--no-progress")
    assert r.exit_code == 0 and "added 3 of 4 images (0 already indexed, 1 unreadable)" in r.output, r.output


def test_the_model_file_messages_hold_for_the_python_api(model_files):
    """`load_embedder` raises the same one-line errors (GuieErrors) to Python callers."""
    from guie.errors import GuieError
    from guie.models import load_embedder

    for kind in BAD_MODELS:
        with pytest.raises(GuieError) as e:
            load_embedder(model_files[kind])
        assert str(model_files[kind]) in str(e.value) and "\n" not in str(e.value)
    assert load_embedder(Path(model_files["good"])).embed_dim == 8
