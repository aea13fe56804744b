"""Export: competition-format TorchScript / ONNX models (raw pixels in, <= 64-d embeddings out), shared-head
ensembles, model soups, test-time augmentation, and the submission checker.

Names are imported on first use (PEP 562), so that importing the package does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "CheckReport": "check", "check_submission": "check", "ConcatPCA": "projection", "fit_concat_pca": "projection",
    "IncompatibleMembersError": "ensemble", "check_shared_head": "ensemble", "ensemble_embeddings": "ensemble",
    "load_members": "ensemble", "soup_checkpoints": "ensemble", "soup_embedders": "ensemble",
    "ExportError": "metadata", "ExportMetadata": "metadata", "read_metadata": "metadata",
    "ExportedEmbedder": "module", "MemberPipeline": "module", "TTAConfig": "module",
    "export_onnx": "onnx", "reference_embed": "reference", "export_model": "formats", "format_for": "formats",
    "ExportResult": "torchscript", "build_exported_module": "torchscript", "export_torchscript": "torchscript",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the submodule that defines `name` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guie.export' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
