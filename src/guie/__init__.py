"""guie: universal image embeddings (<= 64-d) — build, train, measure with the exact GUIE metric, export, search.

The public API, importable from here (each name loads on first use, PEP 562: `import guie` and `guie --help` stay
free of torch's ~3 s import):

    create_embedder, load_embedder, save_embedder, create_backbone, list_backbones, Embedder   (guie.models)
    embed_images                                                                               (guie.embedding)
    mean_precision_at_k                                                                        (guie.metrics)
    load_run_config, run_training                                                              (guie.train)
    export_model                                                                               (guie.export)
    ImageIndex                                                                                 (guie.search)

`guie.train` and `guie.export` are subpackages, so their entry points carry their own names here
(`run_training`, `export_model`) instead of shadowing them.
"""
from importlib import import_module

from ._version import __version__

_EXPORTS = {
    "Embedder": "guie.models", "create_backbone": "guie.models", "create_embedder": "guie.models",
    "list_backbones": "guie.models", "load_embedder": "guie.models", "save_embedder": "guie.models",
    "embed_images": "guie.embedding.engine",
    "mean_precision_at_k": "guie.metrics",
    "load_run_config": "guie.train.recipe", "run_training": "guie.train.engine:train",
    "export_model": "guie.export.formats",
    "ImageIndex": "guie.search",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    """Load a public name from its home module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guie' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    return getattr(import_module(module), attr or name)
