"""One set of model options on every command that runs a model (`guie.cli.options`), and what they promise."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from guie.cli import app
from guie.cli.options import MODEL_OPTION_NAMES
from guie.embedding.files import read_embeddings
from guie.models import save_embedder

# every command that runs a model forward; a new one belongs here (and gets the options with `model_options`)
MODEL_COMMANDS = {"embed", "evaluate", "benchmark", "fit-pca", "index create", "index add", "index search", "serve",
                  "data dedup"}
# commands that take their models as arguments instead of --model
MODELS_AS_ARGUMENTS = {"benchmark"}


SCORING_COMMANDS = {"evaluate", "benchmark"}


def _commands(group, prefix: str = "") -> dict:
    out = {}
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            out.update(_commands(cmd, full + " "))
        else:
            out[full] = cmd
    return out


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_model_command_has_the_shared_model_options():
    commands = _commands(typer.main.get_command(app))
    assert MODEL_COMMANDS <= set(commands), sorted(MODEL_COMMANDS - set(commands))
    for name, cmd in commands.items():
        params = {p.name: p for p in cmd.params}
        shared = [o for o in MODEL_OPTION_NAMES if o in params and o != "model"]
        if name not in MODEL_COMMANDS:
            assert not {"runtime", "precision"} & set(params), f"{name} runs a model: add it to MODEL_COMMANDS"
            continue
        wanted = [o for o in MODEL_OPTION_NAMES if not (o == "model" and name in MODELS_AS_ARGUMENTS)]
        missing = [o for o in wanted if o not in params]
        assert not missing, f"guie {name} lacks {missing}"
        for opt in shared:  # the same flag, default and help everywhere
            assert f"--{opt.replace('_', '-')}" in params[opt].opts, (name, opt)
        assert params["device"].default == "auto" and params["runtime"].default == "auto"
        # commands that score a model measure it in fp32 (a score must not move with the CPU it runs on)
        assert params["precision"].default == ("fp32" if name in SCORING_COMMANDS else "auto"), name


def test_export_traces_on_auto_by_default():
    export = _commands(typer.main.get_command(app))["export"]
    assert {p.name: p for p in export.params}["device"].default == "auto"


@pytest.fixture
def tiny_model(tiny_embedder, tmp_path):
    return save_embedder(tiny_embedder(embed_dim=8, image_size=32), tmp_path / "tiny.pt")


def test_embed_keeps_relative_manifest_paths_and_crop_pct_changes_the_vectors(tmp_path, mode_images, tiny_model):
    import shutil

    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    for kind in ("rgb", "wide", "tall"):
        shutil.copy(mode_images[kind], folder / "img" / mode_images[kind].name)
    rel = [f"img/{mode_images[k].name}" for k in ("rgb", "wide", "tall")]
    pd.DataFrame({"path": rel, "label": ["a", "b", "c"]}).to_csv(folder / "m.csv", index=False)
    out, cropped = tmp_path / "e.parquet", tmp_path / "c.parquet"
    r = run("embed", folder / "m.csv", "-o", out, "--model", tiny_model, "--no-progress")
    assert r.exit_code == 0, r.output
    df, emb = read_embeddings(out)
    assert df["path"].tolist() == rel  # as the manifest listed them, not made absolute
    r = run("embed", folder / "m.csv", "-o", cropped, "--model", tiny_model, "--no-progress", "--crop-pct", "1.0")
    assert r.exit_code == 0, r.output
    _, emb_full = read_embeddings(cropped)
    assert not np.allclose(emb, emb_full, atol=1e-4)  # the whole image instead of the centre crop


@pytest.mark.parametrize("args, expected", [
    (["--model", "/no/such/model.pt"], "/no/such/model.pt: model file not found"),
    (["--model", "runs/x/model.pt"], "runs/x/model.pt: model file not found"),
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt': choose from auto, torch, openvino, onnxruntime"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--runtime", "onnxruntime", "--precision", "bf16"], "does not offer precision bf16"),
])
def test_bad_model_options_fail_in_one_line(args, expected, mode_images, tmp_path):
    r = run("embed", mode_images["rgb"].parent, "-o", tmp_path / "x.parquet", "--no-progress", *args)
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
