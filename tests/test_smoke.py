"""`guie train RECIPE --smoke`: every stage of the shipped recipes runs on a CPU with a tiny backbone of the same
family on generated data, a late-stage mistake fails it naming the stage, and the cost plan's arithmetic."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from guie.cli import app
from guie.train.costs import cost_plan, images_per_second
from guie.train.recipe import load_run_config
from guie.train.smoke import SmokeFailure, run_smoke


def smoke(name, tmp_path, overrides=None, steps=1):
    cfg = load_run_config(name, overrides)
    return cfg, run_smoke(cfg, tmp_path, steps=steps)


def test_first_place_recipe_smoke_runs_all_13_stages_at_every_resolution(tmp_path):
    from guie.models import load_embedder

    cfg, report = smoke("guie-1st-place-vit-h-14", tmp_path)
    assert [s.name for s in report.stages] == [s.name for s in cfg.stages]
    assert all(s.loss is not None and s.val is not None for s in report.stages)
    run = report.run_dir
    first, last = load_embedder(run / "model-stage-00-s1-head.pt"), load_embedder(run / "model.pt")
    # same family (an open_clip ViT with patch 14 and the projection kept), resampled 16x16 -> 20x20 at 280 px
    assert first.spec.backbone.startswith("open_clip:guie-smoke-ViT-H-14")
    at280 = load_embedder(run / "model-stage-08-s9-p10k-backbone-280.pt")
    assert tuple(first.backbone.visual.grid_size) == (16, 16) and tuple(at280.backbone.visual.grid_size) == (20, 20)
    # s10-s13: 290 px through the 14-px patches at stride 12: (290 - 14) // 12 + 1 = 24 a side
    assert tuple(last.backbone.visual.grid_size) == (24, 24) and last.backbone.visual.conv1.stride == (12, 12)
    assert last.preprocess.image_size == 290 and last.spec.backbone_kwargs["patch_stride"] == 12
    assert "open_clip:ViT-H-14 -> a 2-block" in report.table()
    assert "cost plan of the real run" in report.table()


def test_second_place_recipe_smoke_merges_its_14_datasets(tmp_path):
    cfg, report = smoke("guie-2nd-place-vit-h-14", tmp_path)
    assert len(report.stages) == 1 and report.stages[0].loss is not None
    text = report.table()
    assert text.count("generated images") == 14 + 1          # 14 datasets + the validation set
    assert "vit_huge_patch14_clip_224" in text


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["emoji-lite0-cpu", "multi-domain-lite0-cpu"])
def test_cpu_recipes_smoke(tmp_path, recipe):
    cfg, report = smoke(recipe, tmp_path)
    assert [s.name for s in report.stages] == [s.name for s in cfg.stages]
    if recipe.startswith("multi"):  # the specialist teachers are files not on this machine: tiny stand-ins
        assert "distill teacher runs/specialist-glyphs/model-stage-00-head.pt is missing here" in report.table()


def test_a_broken_late_stage_fails_the_smoke_run_in_one_line_naming_it(tmp_path):
    """281 px is no multiple of the 14-px patch: only the stage that switches to it can tell, at its start."""
    r = CliRunner().invoke(app, ["train", "guie-1st-place-vit-h-14", "--smoke", "--smoke-steps", "1",
                                 "--set", "stages.8.image_size=281", "--output-dir", str(tmp_path),
                                 "--stages", "s8-p10k-head-280,s9-p10k-backbone-280"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: smoke run of guie-1st-place-vit-h-14: stage 2/2 's9-p10k-backbone-280' failed: "
                         "image_size 281 is not a multiple of the patch size 14")
    assert "Traceback" not in r.output


def test_run_smoke_raises_smoke_failure(tmp_path):
    cfg = load_run_config("guie-2nd-place-vit-h-14", ["stages.0.image_size=230"])
    with pytest.raises(SmokeFailure, match=r"stage 1/1 'all-stratified' failed: image_size 230"):
        run_smoke(cfg, tmp_path, steps=1, costs=False)


def test_cost_plan_counts_passes_and_hours_from_hints():
    cfg = load_run_config("guie-1st-place-vit-h-14", [
        "datasets.products10k.expected_images=141931"])
    plan = {s.name: s for s in cost_plan(cfg).stages}
    s3, s4, s5, s9 = (plan[n] for n in ("s3-p10k-centres", "s4-p10k-head", "s5-p10k-backbone", "s9-p10k-backbone-280"))
    # s3 caches the frozen features once; s4 (same weights, same view) reuses them; s5 trains the backbone 3 epochs
    assert s3.forward == 141931 and s3.forward_backward == 0 and s4.forward == 0
    assert s5.images == s5.forward_backward == 3 * 141931
    # 224 px bf16 with gradient checkpointing: 336 img/s x 0.75 on an H100
    assert s5.seconds == pytest.approx(3 * 141931 / (336 * 0.75))
    # 280 px: 401 tokens instead of 257
    assert s9.seconds == pytest.approx(s5.seconds * 401 / 257)
    assert images_per_second("vit_huge_patch14_clip_224", 290, 12, "infer") == pytest.approx(1203 * 257 / 577)


def test_tiny_stand_ins_keep_the_family(tmp_path):
    from guie.models import create_embedder
    from guie.train.smoke import tiny_backbone

    name, kwargs, what = tiny_backbone("timm:vit_huge_patch14_clip_224", {}, tmp_path)
    emb = create_embedder(name, 8, pretrained=False, image_size=56, **kwargs)
    assert type(emb.backbone.model).__name__ == "VisionTransformer" and len(emb.backbone.model.blocks) == 2
    assert emb.backbone.model.patch_embed.patch_size == (14, 14)
    name, kwargs, _ = tiny_backbone("open_clip:ViT-L-14:openai", {"keep_projection": False}, tmp_path)
    emb = create_embedder(name, 8, pretrained=False, **kwargs)
    assert emb.backbone.visual.proj is None and emb.backbone.visual.conv1.kernel_size == (14, 14)
    assert emb.preprocess.image_size == 224
