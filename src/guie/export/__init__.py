"""Export: competition-format TorchScript / ONNX models (raw pixels in, <= 64-d embeddings out), shared-head
ensembles, model soups, test-time augmentation, and the submission checker.

Names are imported on first use, so that `guie --help` (which loads `guie.export.commands`) does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "CheckReport": "check", "check_submission": "check",
    "IncompatibleMembersError": "ensemble", "check_shared_head": "ensemble", "ensemble_embeddings": "ensemble",
    "load_members": "ensemble", "soup_checkpoints": "ensemble", "soup_embedders": "ensemble",
    "ExportError": "metadata", "ExportMetadata": "metadata", "read_metadata": "metadata",
    "ExportedEmbedder": "module", "MemberPipeline": "module", "TTAConfig": "module",
    "export_onnx": "onnx", "reference_embed": "reference",
    "ExportResult": "torchscript", "build_exported_module": "torchscript", "export_torchscript": "torchscript",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guie.export' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
