"""The shipped recipes (src/guie/recipes/, package data) load as typed dataclasses, by name too, and say what their
comments claim."""
import re
from pathlib import Path

import pytest

from guie.data.builder import load_recipe
from guie.train.recipe import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "guie" / "recipes"
RUN_RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("data-"))
DATA_RECIPES = sorted(p.name for p in CONFIGS.glob("data-*.yaml"))


@pytest.mark.parametrize("name", RUN_RECIPES)
def test_run_recipes_load_and_every_stage_trains_something(name):
    cfg = load_run_config(CONFIGS / name)
    assert cfg.model.embed_dim <= 64
    assert cfg.stages and all(stage.train for stage in cfg.stages)
    for stage in cfg.stages:
        assert set(stage.datasets) <= set(cfg.datasets), stage.name


def test_data_mix_recipe_loads():
    recipe = load_recipe(CONFIGS / "data-mix.yaml")
    assert len(recipe.datasets) >= 5


@pytest.mark.parametrize("name", DATA_RECIPES)
def test_every_data_recipe_loads(name):
    assert load_recipe(CONFIGS / name).datasets


def test_emoji_recipe_is_head_then_backbone_with_head_locked():
    stages = load_run_config(CONFIGS / "emoji-lite0-cpu.yaml").stages
    assert [s.train for s in stages] == [["head", "centers"], ["backbone"]]
    assert stages[1].lr["backbone"] < stages[0].lr["head"] / 100


def test_first_place_recipe_matches_the_paper_schedule():
    cfg = load_run_config(CONFIGS / "guie-1st-place-vit-h-14.yaml")
    s1, s2 = cfg.stages[:2]
    assert cfg.model.dropout == 0.2 and cfg.model.backbone.startswith("open_clip:ViT-H-14")
    assert (s1.train, s1.lr["head"], s1.batch_size, s1.epochs) == (["head", "centers"], 0.02, 256, 6)
    assert (s2.train, s2.lr["backbone"], s2.batch_size, s2.epochs) == (["backbone"], 2.5e-4, 32, 3)
    assert s1.loss.name == "cosface" and s1.loss.scale == 30 and s1.loss.margin == 0.55
    sizes = [s.image_size for s in cfg.stages]
    first_280 = sizes.index(280)                     # a stage's image_size stays in force for the stages after it
    assert cfg.stages[first_280].new_centers and set(sizes[first_280 + 1:]) <= {None, 280}


def test_select_stages_keeps_recipe_order_and_names_unknown_ones():
    from guie.typed_yaml import ConfigError

    cfg = load_run_config(CONFIGS / "guie-1st-place-vit-h-14.yaml")
    cfg.select_stages(["s2-backbone", "s1-head"])
    assert [s.name for s in cfg.stages] == ["s1-head", "s2-backbone"]
    with pytest.raises(ConfigError, match="no-such-stage.*s1-head"):
        cfg.select_stages(["no-such-stage"])


def test_cli_train_refuses_an_unknown_stage_in_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "guie.cli", "train", str(CONFIGS / "emoji-lite0-cpu.yaml"),
                        "--stages", "hed"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown stage(s) ['hed']" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override, match", [
    ("model.preprocess.crop_pct=1.5", r"\.model\.preprocess: crop_pct must be in \(0, 1\]"),
    ("model.preprocess.crop_size=1", r"\.model\.preprocess: unknown key\(s\) \['crop_size'\]"),
    ("stages.0.augment.hflip=often", r"\.stages\[0\]\.augment\.hflip: expected float"),
    ("stages.0.augment.rotate=500", r"\.stages\[0\]\.augment: augment: rotate must be"),
    ("stages.0.lr.neck=0.1", r"\.stages\[0\]: stage 's1-head': unknown part\(s\) \['neck'\] in 'lr'"),
    ("stages.0.lr.head=fast", r"\.stages\[0\]\.lr\.head: expected float"),
])
def test_plain_mapping_fields_are_typed_with_file_and_key_in_errors(override, match):
    from guie.typed_yaml import ConfigError

    recipe = CONFIGS / "guie-1st-place-vit-h-14.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(recipe)) + match):
        load_run_config(recipe, [override])


def test_override_mappings_keep_only_the_given_keys_with_their_types():
    stage = load_run_config(CONFIGS / "emoji-lite0-cpu.yaml").stages[1]
    assert stage.augment["rotate"] == 5.0 and isinstance(stage.augment["rotate"], float)
    assert "fill" not in stage.augment                  # the others keep AugmentConfig's defaults when used
    assert load_run_config(CONFIGS / "emoji-lite0-cpu.yaml").model.preprocess == {"crop_pct": 1.0}


def test_an_override_of_an_aliased_key_changes_only_the_stage_it_names():
    """The multi-domain recipe shares one `distill:` block between its stages by a YAML alias; overriding it in
    stage 2 used to change stage 1's too (the alias is one object until the loader copies it)."""
    cfg = load_run_config(CONFIGS / "multi-domain-lite0-cpu.yaml", ["stages.2.distill.weight=8",
                                                                      "stages.2.distill.teachers.icons=other.pt"])
    assert cfg.stages[2].distill.weight == 8.0 and cfg.stages[2].distill.teachers["icons"] == "other.pt"
    assert cfg.stages[1].distill.weight == 3.0 and cfg.stages[1].distill.teachers["icons"] != "other.pt"


@pytest.mark.parametrize("override, match", [
    ("stages.9.steps=1", r": override 'stages\.9\.steps=1': stages has 2 item\(s\), so 9 is out of range \(0\.\.1\)$"),
    ("stages.head.steps=1", r": override 'stages\.head\.steps=1': stages is a list; index it by number"),
    ("seed.value=1", r": override 'seed\.value=1': seed is 0, not a mapping or list$"),
    ("stages.0.lr={head: 0.1", r": override 'stages\.0\.lr=\{head: 0\.1': invalid YAML value at line 1"),
    ("model.dropout=1.5", r"\.model: dropout must be in \[0, 1\), got 1\.5$"),        # was reported at train time
    ("stages.1.dropout=-0.1", r"\.stages\[1\]: dropout must be in \[0, 1\), got -0\.1$"),
])
def test_recipe_override_errors_name_the_file_and_key_in_one_line(override, match):
    """Each was a traceback (IndexError, ValueError) or an error without the recipe file or key."""
    from guie.typed_yaml import ConfigError

    recipe = CONFIGS / "emoji-lite0-cpu.yaml"
    with pytest.raises(ConfigError, match="^" + re.escape(str(recipe)) + match) as info:
        load_run_config(recipe, [override])
    assert "\n" not in str(info.value)


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    from guie.typed_yaml import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [a\n  b: 1\n")
    with pytest.raises(ConfigError) as info:  # PyYAML's own message takes 8 lines
        load_run_config(bad)
    assert str(info.value) == f"{bad}: invalid YAML at line 3, column 4: expected ',' or ']', but got ':'"


def test_a_run_failing_before_its_first_step_leaves_no_run_folder(tmp_path):
    from guie.train.engine import train

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: doomed
output_dir: {tmp_path / 'run'}
cache_dir: {tmp_path / 'cache'}
model: {{backbone: "timm:test_efficientnet", pretrained: false, embed_dim: 8, image_size: 32}}
datasets: {{gen: {{manifest: {tmp_path / 'no-such-manifest.csv'}}}}}
stages: [{{name: head, datasets: [gen], steps: 1}}]
""")
    cfg = load_run_config(recipe)
    with pytest.raises(Exception, match="no-such-manifest"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # was left with metrics.csv, tensorboard/ and config.yaml
    (tmp_path / "run").mkdir()  # a folder the user made is not removed
    with pytest.raises(Exception, match="no-such-manifest"):
        train(cfg, progress=False)
    assert (tmp_path / "run").is_dir()


def test_recipes_load_by_name_and_the_cli_lists_every_shipped_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from guie.cli import app
    from guie.typed_yaml import ConfigError, find_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)  # names work from any folder
    assert set(shipped_recipes()) == {p.stem for p in CONFIGS.glob("*.yaml")}
    assert find_recipe("emoji-lite0-cpu") == find_recipe("emoji-lite0-cpu.yaml") == CONFIGS / "emoji-lite0-cpu.yaml"
    assert load_run_config("emoji-lite0-cpu").name == "emoji-lite0-cpu"
    (tmp_path / "emoji-lite0-cpu.yaml").write_text("name: mine\nstages: []\ndatasets: {}\n")
    assert find_recipe("emoji-lite0-cpu.yaml") == Path("emoji-lite0-cpu.yaml")  # a file wins over a shipped name
    with pytest.raises(ConfigError, match=r"^emoji-lite0: recipe not found \(no such file, and not one of the "
                                          r"shipped recipes: .*emoji-lite0-cpu"):
        find_recipe("emoji-lite0")
    r = CliRunner().invoke(app, ["recipes"])
    assert r.exit_code == 0, r.output
    kinds = dict(line.split()[:2] for line in r.output.splitlines())
    assert kinds == {name: ("data" if name.startswith("data-") else "train") for name in shipped_recipes()}
