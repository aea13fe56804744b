"""What an exported file says about itself: the input/output contract, its members and TTA, stored as JSON inside
the file (TorchScript: an extra file in the archive; ONNX: a metadata_props entry), so `guie check-submission` and
users can tell what a model expects without guie's source."""
from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import GuieError, InputError, MissingFileError
from ..models.embedder import Embedder
from ..models.heads import MAX_EMBED_DIM

METADATA_FORMAT = "guie-export/1"
METADATA_NAME = "guie_export.json"   # TorchScript extra file name
ONNX_METADATA_KEY = "guie_export"
INPUT_CONTRACT = ("uint8 RGB images, values 0..255, [3,H,W] or [B,3,H,W] (ONNX: [B,3,H,W]), any H and W >= 2; "
                  "float input (TorchScript only) is read as values in [0,1]")
OUTPUT_CONTRACT = "float32 [B,d], L2-normalised; B = 1 for a single image"


class ExportError(GuieError, RuntimeError):
    """An export that could not be made or failed its own verification; the message says which step."""


@dataclass
class ExportMetadata:
    """JSON-serialisable description of an exported model."""

    embed_dim: int
    members: list[dict]
    tta: dict
    format: str = METADATA_FORMAT
    input: str = INPUT_CONTRACT
    output: str = OUTPUT_CONTRACT
    versions: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    projection: dict | None = None    # members concatenated + PCA (guie.export.projection.ConcatPCA.to_dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportMetadata:
        d = json.loads(text)
        if d.get("format") != METADATA_FORMAT:
            raise InputError(f"unknown export metadata format {d.get('format')!r} (expected {METADATA_FORMAT!r})")
        return cls(**d)


def validate_members(embedders: Sequence[Embedder], max_dim: int | None = MAX_EMBED_DIM, projection=None) -> int:
    """Check the members can form one exported model; return the output dimension."""
    if not embedders:
        raise ExportError("nothing to export: no model given")
    if projection is not None:
        dims = [e.embed_dim for e in embedders]
        if dims != list(projection.member_dims):
            raise ExportError(f"the projection was fitted on members of dims {projection.member_dims}, these have "
                              f"{dims}")
        if max_dim is not None and projection.dim > max_dim:
            raise ExportError(f"the projection outputs {projection.dim} dims, over the limit of {max_dim}")
        return projection.dim
    dims = {e.embed_dim for e in embedders}
    if len(dims) != 1:
        raise ExportError(f"members output different dimensions {sorted(dims)}; an ensemble needs one")
    dim = dims.pop()
    if max_dim is not None and dim > max_dim:
        raise ExportError(f"the model outputs {dim}-d embeddings, over the GUIE limit of {max_dim}: export a model "
                          "with a projection head (embed_dim <= 64), project it with a PCA (concat-pca), or lift the "
                          "limit (max_dim) for serving")
    return dim


def build_metadata(embedders: Sequence[Embedder], tta, checkpoints: Sequence[str | None] | None = None,
                   verification: dict | None = None, projection=None) -> ExportMetadata:
    """Metadata for an export of `embedders` (checkpoint paths recorded so parity can be checked later)."""
    import torch

    from .._version import __version__

    checkpoints = list(checkpoints or [None] * len(embedders))
    members = [{"checkpoint": str(Path(c).resolve()) if c else None, "backbone": e.spec.backbone,
                "embed_dim": e.embed_dim, "preprocess": e.preprocess.to_dict()}
               for e, c in zip(embedders, checkpoints)]
    versions = {"guie": __version__, "torch": torch.__version__}
    dim = projection.dim if projection is not None else embedders[0].embed_dim
    return ExportMetadata(embed_dim=dim, members=members, tta=tta.to_dict(), versions=versions,
                          verification=verification or {},
                          projection=projection.to_dict() if projection is not None else None)


def read_metadata(path: str | Path) -> ExportMetadata | None:
    """The guie metadata of an exported .pt (TorchScript) or .onnx file; None if it has none."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "exported model")
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY), None)
    else:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a TorchScript archive (nor a .onnx file)")
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"/extra/{METADATA_NAME}")), None)
            text = zf.read(name).decode() if name else None
    return ExportMetadata.from_json(text) if text else None
