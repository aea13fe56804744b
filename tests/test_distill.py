"""Relational distillation (guie.losses.distill) against a naive per-anchor loop, and its recipe / engine wiring."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from guie.embedding.engine import embed_images
from guie.losses import RelationalDistillLoss, mirror_similarity_loss
from guie.models.embedder import create_embedder, save_embedder
from guie.pipeline.datasets import stack_images, transform_file
from guie.train.data import build_stage_data
from guie.train.engine import Trainer
from guie.train.frozen_features import mirror_feature_cache, teacher_mirror_similarity
from guie.train.recipe import DistillConfig, load_run_config
from train_fixtures import make_labelled_images, tiny_recipe


def naive_distill(student, teacher, groups, temperature):
    """Per anchor: softmax over the cosine similarities to the other members of its group, KL(teacher || student)."""
    s = [v / v.norm() for v in student]
    t = [v / v.norm() for v in teacher]
    losses = []
    for i in range(len(s)):
        if groups[i] < 0:
            continue
        others = [j for j in range(len(s)) if j != i and groups[j] == groups[i]]
        if not others:
            continue
        zs = [float(s[i] @ s[j]) / temperature for j in others]
        zt = [float(t[i] @ t[j]) / temperature for j in others]
        ls = [z - math.log(sum(math.exp(x) for x in zs)) for z in zs]
        lt = [z - math.log(sum(math.exp(x) for x in zt)) for z in zt]
        losses.append(sum(math.exp(a) * (a - b) for a, b in zip(lt, ls)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_distill_loss_matches_a_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g) * 3
    groups = torch.tensor([0, 0, 1, 1, 1, -1, 0, 2, 1, 0])   # group 2 has one member: no partner, skipped
    loss = RelationalDistillLoss(temperature)(student, teacher, groups)
    assert loss.item() == pytest.approx(naive_distill(student, teacher, groups.tolist(), temperature), rel=1e-4)
    ungrouped = RelationalDistillLoss(temperature)(student, teacher)
    assert ungrouped.item() == pytest.approx(naive_distill(student, teacher, [0] * 10, temperature), rel=1e-4)


def test_group_weights_scale_each_domains_anchors():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, -1, 2])       # anchors: 3 of group 0, 4 of group 1; group 2 alone
    per_group = [naive_distill(student, teacher, [x if x == k else -1 for x in groups.tolist()], 0.1) for k in (0, 1)]
    weighted = RelationalDistillLoss(0.1, group_weights=[0.5, 4.0, 7.0])(student, teacher, groups)
    assert weighted.item() == pytest.approx((3 * 0.5 * per_group[0] + 4 * 4.0 * per_group[1]) / 7, rel=1e-4)
    ones = RelationalDistillLoss(0.1, group_weights=[1.0, 1.0, 1.0])(student, teacher, groups)
    assert ones.item() == pytest.approx(RelationalDistillLoss(0.1)(student, teacher, groups).item(), rel=1e-6)
    muted = RelationalDistillLoss(0.1, group_weights=[0.0, 1.0, 1.0])(student, teacher, groups)
    assert muted.item() == pytest.approx(4 * per_group[1] / 7, rel=1e-4)
    with pytest.raises(ValueError, match="has no weight"):
        RelationalDistillLoss(0.1, group_weights=[1.0])(student, teacher, groups)
    with pytest.raises(ValueError, match=">= 0"):
        RelationalDistillLoss(0.1, group_weights=[1.0, -1.0])


def test_distill_domain_weights_follow_the_teacher_groups_and_name_real_domains():
    cfg = DistillConfig(teachers={"icons": "i.pt", "emoji": "e.pt", "glyphs": "g.pt"}, weight=3.0,
                        domain_weights={"icons": 2.5})
    assert cfg.group_weights() == [1.0, 1.0, 2.5]        # sorted domains: emoji, glyphs, icons
    assert DistillConfig(teachers={"emoji": "e.pt"}, weight=1.0).group_weights() is None
    with pytest.raises(ValueError, match=r"\['icon'\] without a teacher"):
        DistillConfig(teachers={"icons": "i.pt"}, weight=1.0, domain_weights={"icon": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        DistillConfig(teachers={"icons": "i.pt"}, weight=1.0, domain_weights={"icons": -1.0})


def test_distill_loss_is_zero_for_the_same_geometry_and_trains_only_the_student():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 5, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    loss_fn = RelationalDistillLoss(0.1)
    assert loss_fn(2.0 * teacher @ rotation, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(8, 5, generator=g, requires_grad=True)
    teacher.requires_grad_(True)
    loss = loss_fn(student, teacher)
    assert loss.item() > 0
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    lonely = loss_fn(student, teacher, torch.tensor([0, 1, 2, 3, -1, -1, 4, 5]))
    assert lonely.item() == 0.0 and lonely.requires_grad
    with pytest.raises(ValueError, match="temperature"):
        RelationalDistillLoss(0.0)


STAGES = """  - name: head
    datasets: [gen]
    train: [head, centers]
    steps: 10
    batch_size: 16
    lr: {{head: 0.05, centers: 0.05}}
    distill: {{teachers: {{{teachers}}}, weight: {weight}, temperature: 0.2}}
"""


def _distill_recipe(tmp_path, manifest, teachers: str, weight: float, name: str):
    text = tiny_recipe(manifest, tmp_path / name, tmp_path / "cache", STAGES.format(teachers=teachers, weight=weight))
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_run_config(path)


def test_a_distilled_stage_trains_towards_its_teachers(tmp_path):
    manifest = make_labelled_images(tmp_path / "gen", n_classes=12, per_class=4)
    teacher = create_embedder("efficientnet_lite0", 16, image_size=32, preprocess={"crop_pct": 1.0}, seed=5)
    save_embedder(teacher, tmp_path / "teacher.pt")
    teachers = ", ".join(f"dom{d}: {tmp_path / 'teacher.pt'}" for d in range(3))
    plain = Trainer(_distill_recipe(tmp_path, manifest, teachers, 0.0, "plain"), progress=False)
    plain.run()
    distilled = Trainer(_distill_recipe(tmp_path, manifest, teachers, 5.0, "distilled"), progress=False)
    distilled.run()
    df = pd.read_csv(manifest)
    paths = [str(manifest.parent / p) for p in df.loc[df["split"].isin(["train", "val"]), "path"]]
    target = embed_images(teacher, paths, batch_size=64, num_workers=0, progress=False).embeddings
    gaps = [RelationalDistillLoss(0.2)(torch.as_tensor(embed_images(t.embedder, paths, batch_size=64, num_workers=0,
                                                                      progress=False).embeddings),
                                       torch.as_tensor(target)).item() for t in (plain, distilled)]
    assert gaps[1] < gaps[0]     # the distilled head's neighbourhoods are closer to the teacher's
    zeros = ", ".join(f"dom{d}: 0.0" for d in range(3))      # every domain weighted 0: the plain run, to the bit
    muted_cfg = _distill_recipe(tmp_path, manifest, teachers, 5.0, "muted")
    assert muted_cfg.stages[0].distill.group_weights() is None
    muted_cfg = load_run_config(tmp_path / "muted.yaml", [f"stages.0.distill.domain_weights={{{zeros}}}"])
    assert muted_cfg.stages[0].distill.group_weights() == [0.0, 0.0, 0.0]
    muted = Trainer(muted_cfg, progress=False)
    muted.run()
    for a, b in zip(plain.embedder.head.state_dict().values(), muted.embedder.head.state_dict().values()):
        assert torch.equal(a, b)


def test_distill_refuses_a_teacher_on_other_features_and_a_trained_backbone(tmp_path):
    manifest = make_labelled_images(tmp_path / "gen", n_classes=12, per_class=4)
    other = create_embedder("efficientnet_lite0", 16, image_size=48, preprocess={"crop_pct": 1.0})
    save_embedder(other, tmp_path / "other.pt")
    cfg = _distill_recipe(tmp_path, manifest, f"dom0: {tmp_path / 'other.pt'}", 1.0, "bad")
    with pytest.raises(ValueError, match="does not read the student's features"):
        Trainer(cfg, progress=False).run()
    text = STAGES.format(teachers=f"dom0: {tmp_path / 'other.pt'}", weight=1.0).replace(
        "train: [head, centers]", "train: [backbone]").replace("head: 0.05, centers: 0.05", "backbone: 0.001")
    (tmp_path / "bb.yaml").write_text(tiny_recipe(manifest, tmp_path / "bb", tmp_path / "cache", text))
    with pytest.raises(ValueError, match="distill has the mirror term alone"):
        load_run_config(tmp_path / "bb.yaml")


def test_a_teacher_can_be_an_earlier_stage_of_the_same_run(tmp_path):
    manifest = make_labelled_images(tmp_path / "gen", n_classes=12, per_class=4)
    first = STAGES.format(teachers="", weight=0.0).replace("distill: {teachers: {}, weight: 0.0, temperature: 0.2}",
                                                           "distill: {weight: 0.0}")
    second = STAGES.format(teachers="dom0: 'stage:head', dom1: 'stage:head'", weight=1.0).replace("name: head",
                                                                                                  "name: again")
    (tmp_path / "two.yaml").write_text(tiny_recipe(manifest, tmp_path / "two", tmp_path / "cache", first + second))
    cfg = load_run_config(tmp_path / "two.yaml")
    assert Trainer(cfg, progress=False).run().exists()
    (tmp_path / "bad.yaml").write_text(tiny_recipe(manifest, tmp_path / "bad", tmp_path / "cache",
                                                   second.replace("stage:head", "stage:later")))
    with pytest.raises(ValueError, match="no earlier stage named 'later'"):
        Trainer(load_run_config(tmp_path / "bad.yaml"), progress=False).run()


def _flip_similarity(embedder, paths) -> torch.Tensor:
    """Per image: cosine similarity of its embedding to its left-right mirror's."""
    x = stack_images([transform_file(embedder.transform, p) for p in paths])
    with torch.no_grad():
        return (embedder(x) * embedder(torch.flip(x, dims=[-1]))).sum(-1)


def test_mirror_similarity_loss_by_hand():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    # student: an image equal to its mirror (cos 1); teacher: orthogonal (cos 0) -> (1 - 0)^2
    assert mirror_similarity_loss(e1, 2 * e1, e1, e2).item() == pytest.approx(1.0)
    both = mirror_similarity_loss(torch.cat([e1, e1]), torch.cat([e1, e2]), torch.cat([e1, e1]), torch.cat([e2, e2]))
    assert both.item() == pytest.approx(0.5)    # pair 1: (1 - 0)^2, pair 2: (0 - 0)^2; the mean
    student = torch.randn(4, 8, requires_grad=True)
    mirror_similarity_loss(student, torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)).backward()
    assert student.grad.abs().sum() > 0


def test_mirror_domains_distil_each_image_against_its_mirror(tmp_path):
    with pytest.raises(ValueError, match="mirror_domains names domain"):
        DistillConfig(teachers={"dom0": "t.pt"}, weight=1.0, mirror_domains=["dom9"])
    with pytest.raises(ValueError, match="mirror_weight must be >= 0 and needs distill.mirror_domains"):
        DistillConfig(teachers={"dom0": "t.pt"}, weight=1.0, mirror_weight=2.0)
    manifest = make_labelled_images(tmp_path / "gen", n_classes=12, per_class=4)
    teacher = create_embedder("efficientnet_lite0", 16, image_size=32, preprocess={"crop_pct": 1.0}, seed=5)
    save_embedder(teacher, tmp_path / "teacher.pt")
    teachers = ", ".join(f"dom{d}: {tmp_path / 'teacher.pt'}" for d in range(3))
    runs = {}
    for name, mirror, weight in (("plain", "[]", 0), ("mirror", "[dom0, dom1, dom2]", 10)):
        _distill_recipe(tmp_path, manifest, teachers, 5.0, name)
        cfg = load_run_config(tmp_path / f"{name}.yaml", [f"stages.0.distill.mirror_domains={mirror}",
                                                          f"stages.0.distill.mirror_weight={weight}",
                                                          "stages.0.steps=60"])
        runs[name] = Trainer(cfg, progress=False)
    trainer = runs["mirror"]
    data = build_stage_data(trainer.cfg, trainer.cfg.stages[0])
    feats, mask = mirror_feature_cache(trainer.embedder, data.df, ["dom0"], trainer.feature_cache)
    assert mask.tolist() == (data.df["domain"] == "dom0").tolist() and 0 < int(mask.sum()) < len(mask)
    assert feats[0, ~mask].abs().max() == 0
    rows = np.flatnonzero(mask.numpy())[:6]
    x = stack_images([transform_file(trainer.embedder.transform, p) for p in data.df["path"].iloc[rows]])
    with torch.no_grad():
        mirrored, clean = (trainer.embedder.eval().forward_features(v) for v in (torch.flip(x, dims=[-1]), x))
    torch.testing.assert_close(feats[0, rows].float(), mirrored, atol=2e-2, rtol=1e-2)  # float16 in the cache
    assert (clean - mirrored).abs().max() > 0.1     # the generated shapes are not symmetric: a mirror differs
    for run in runs.values():
        run.run()
    # the mirror-distilled head holds each dom0 image as (dis)similar to its mirror as the teacher does
    paths = data.df["path"].tolist()
    want = _flip_similarity(teacher.eval(), paths)
    errors = {name: (_flip_similarity(run.embedder.eval(), paths) - want).abs().mean().item()
              for name, run in runs.items()}
    assert errors["mirror"] < 0.7 * errors["plain"], errors


def test_an_image_stage_holds_each_image_to_its_mirror_as_its_teacher_does(tmp_path):
    """The mirror term where the backbone trains: the teacher (any backbone: here another input size) gives one
    image-to-mirror similarity per image of the mirror domains, once; the student's backbone is pulled to it."""
    manifest = make_labelled_images(tmp_path / "gen", n_classes=12, per_class=4)
    teacher = create_embedder("efficientnet_lite0", 16, image_size=48, preprocess={"crop_pct": 1.0}, seed=5)
    save_embedder(teacher, tmp_path / "teacher.pt")
    stage = STAGES.format(teachers=f"dom0: {tmp_path / 'teacher.pt'}", weight=5.0).replace(
        "train: [head, centers]", "train: [backbone]").replace("head: 0.05, centers: 0.05", "backbone: 0.0002")
    runs = {}
    for name, weight in (("plain", 0), ("mirror", 200)):   # x 5: the term is squared gaps of ~0.05
        (tmp_path / f"{name}.yaml").write_text(tiny_recipe(manifest, tmp_path / name, tmp_path / "cache", stage))
        cfg = load_run_config(tmp_path / f"{name}.yaml", ["stages.0.distill.mirror_domains=[dom0]",
                                                          f"stages.0.distill.mirror_weight={weight}",
                                                          "stages.0.distill.weight=" + ("5.0" if weight else "0.0"),
                                                          "stages.0.steps=40", "checkpoint_every_steps=1000"])
        runs[name] = Trainer(cfg, progress=False)
    trainer = runs["mirror"]
    data = build_stage_data(trainer.cfg, trainer.cfg.stages[0])
    targets = teacher_mirror_similarity(data.df, {"dom0": tmp_path / "teacher.pt"}, ["dom0"], trainer.feature_cache)
    dom0 = torch.as_tensor((data.df["domain"] == "dom0").to_numpy().copy())
    assert torch.isnan(targets[~dom0]).all() and not torch.isnan(targets[dom0]).any()
    paths = data.df["path"].tolist()
    want = _flip_similarity(teacher.eval(), [p for p, d in zip(paths, dom0) if d])
    torch.testing.assert_close(targets[dom0], want, atol=2e-3, rtol=0)   # teacher features cached as float16
    for run in runs.values():
        head = {k: v.clone() for k, v in run.embedder.head.state_dict().items()}
        run.run()
        assert all(torch.equal(head[k], v) for k, v in run.embedder.head.state_dict().items())  # the head locked
    errors = {name: (_flip_similarity(run.embedder.eval(), [p for p, d in zip(paths, dom0) if d]) - want).abs()
              .mean().item() for name, run in runs.items()}
    assert errors["mirror"] < 0.7 * errors["plain"], errors
