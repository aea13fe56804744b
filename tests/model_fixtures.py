"""Tiny random-initialised architectures registered by name, for tests that must build a real model family offline."""
from __future__ import annotations

import json
from pathlib import Path


def register_tiny_open_clip(folder: Path, name: str, *, embed_dim: int, width: int, head_width: int, layers: int,
                            text_width: int = 32, vocab_size: int = 100) -> dict:
    """Write an OpenCLIP model config (ViT at 32 px, patch 8) into `folder` and register it as `name`.

    Returns the config; build it with `create_embedder(f"open_clip:{name}", pretrained=False, ...)`.
    """
    import open_clip

    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "head_width": head_width,
                          "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": vocab_size, "width": text_width, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return cfg
