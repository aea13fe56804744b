"""The ONNX Runtime runtime: the model exported once to ONNX (`torch.onnx.export`, dynamic batch, uint8 input;
cached by `cache.load_or_convert`), run on the CPU as `parallel` single-threaded runs side by side.

One session with one intra-op thread and no spinning (ONNX Runtime's spinning threads otherwise keep a core busy
after each run and slow whatever runs next); each call splits its batch over up to `parallel` threads, each calling
`session.run` on its chunk (ONNX Runtime releases the GIL while it runs). fp32 only.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .base import InferenceRuntime, RuntimeEntry, RuntimeUnavailable, register_runtime
from .cache import load_or_convert
from .openvino_runtime import ForwardModule, conversion_key, example_images


@functools.lru_cache(maxsize=1)
def onnxruntime_unavailable() -> str | None:
    """Why ONNX Runtime cannot run here (None: it can)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"the onnxruntime package is not installed ({e.name or e})"
    if "CPUExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime has no CPU execution provider"
    return None


@contextlib.contextmanager
def _quiet():
    """The exporter's libraries log every graph pass at INFO and warn about tracing: keep guie's log readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx_bytes(embedder, features: bool) -> bytes:
    """The model as ONNX (input "images" uint8 [B, 3, S, S] with dynamic B); RuntimeUnavailable when it fails."""
    embedder.eval()
    module = ForwardModule(embedder, features).eval()
    with tempfile.TemporaryDirectory(prefix="guie-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(module, (example_images(embedder),), str(path), input_names=["images"],
                                  output_names=["vectors"], opset_version=18, external_data=False,
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        except Exception as e:  # noqa: BLE001 - the exporter's failures have no common type; reported in one line
            raise RuntimeUnavailable(f"ONNX export of {embedder.spec.backbone} failed "
                                     f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})"
                                     ) from None
        return path.read_bytes()


def onnx_session(model: bytes | str, threads: int = 1):
    """A CPU session with `threads` intra-op threads and no spinning (see the module docstring)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class OnnxRuntime(InferenceRuntime):
    """An ONNX Runtime session on the CPU; see the module docstring for the thread layout."""

    name = "onnxruntime"

    def __init__(self, embedder, precision: str, features: bool, cache_dir=None, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(torch.device("cpu"), features)
        self.precision = precision
        total = torch.get_num_threads()
        self.parallel = max(1, min(threads or total, total))

        def save(blob: bytes, folder: Path) -> None:
            (folder / "model.onnx").write_bytes(blob)

        def load(folder: Path):
            return onnx_session(str(folder / "model.onnx"), max(1, total // self.parallel))

        result = load_or_convert("onnxruntime", conversion_key(embedder, "onnxruntime", features), ort.__version__,
                                 lambda: export_onnx_bytes(embedder, features), save, load, cache_dir,
                                 what="ONNX Runtime")
        self.session = onnx_session(result, max(1, total // self.parallel)) if isinstance(result, bytes) else result
        self.input_name = self.session.get_inputs()[0].name
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="guie-onnxruntime")

    @property
    def layout(self) -> str:
        return f"{self.parallel} single-threaded run(s) side by side, a batch split over them"

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: chunk})[0]

    def numpy(self, images: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(images.detach().cpu().numpy())
        if len(x) <= 1 or self.parallel == 1:
            return self._run(x)
        return np.concatenate(list(self._pool.map(self._run, np.array_split(x, min(self.parallel, len(x))))))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.numpy(images))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _build(embedder, precision: str, device: torch.device, features: bool, cache_dir=None, forwards=None, **_):
    return OnnxRuntime(embedder, precision, features, cache_dir, threads=forwards)


register_runtime(RuntimeEntry("onnxruntime", devices=("cpu",), precisions=("fp32",),
                              unavailable=onnxruntime_unavailable, build=_build))
