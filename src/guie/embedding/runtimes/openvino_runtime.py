"""The OpenVINO runtime: the model converted once (`ov.convert_model` from the PyTorch module, cached as OpenVINO IR
by `cache.load_or_convert`), compiled for the CPU with one stream per core.

Thread layout: `parallel` streams (`NUM_STREAMS`; default one per intra-op thread of torch's count, so each stream
is a single-threaded forward; `forwards` given: that many streams sharing the threads) and exactly `parallel` infer
requests. A call splits its batch into chunks of at most `chunk` images and keeps the idle requests it took busy
with them (OpenVINO releases the GIL while they run and while the caller waits). So one caller keeps every core
busy, several callers (the engine's decode-and-forward threads, the search server's batcher threads) share the
streams, and memory stays that of `parallel` chunk-sized forwards however many callers there are (each request keeps
its own activation buffers, ~20 MB an image for EfficientNet-Lite0 at 224 px: unbounded requests of whole batches
took 0.7 GB more in `guie embed`; chunks of 4 ran as fast as chunks of 32). Completion callbacks were tried and
dropped: they need the GIL on OpenVINO's threads, so a caller decoding in Python delayed the other's requests
(`guie embed` ran at half the bare loop's speed). Single-threaded streams never wait at a barrier for a core another
process took, which is why one forward split over all cores is not the default.

The input is uint8 NHWC (a `PrePostProcessor` transposes inside the compiled model): guie's batches are
channels_last, so they go in without a copy. Precision is a compile-time hint on the same fp32 IR
(`INFERENCE_PRECISION_HINT`): fp32 equals torch within ~1e-6; bf16 only on CPUs with native bf16. int8 is another
IR: the checkpoint's quantized model (`guie.export.quantize`, kept beside the checkpoint; `quantized_model`), its
unquantized layers at the precision it was measured with.
"""
from __future__ import annotations

import collections
import functools
import queue
import warnings

import numpy as np
import torch

from ...errors import InputError
from .base import (
    InferenceRuntime,
    RuntimeEntry,
    RuntimeUnavailable,
    cpu_has_native_bf16,
    quantized_folder,
    quantized_record,
    register_runtime,
)
from .cache import load_or_convert

_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


@functools.lru_cache(maxsize=1)
def openvino_core():
    """The process's one `ov.Core`, shared by every read, compile and device query.

    OpenVINO's plugins are not made to be started by many Cores in one process: creating a fresh Core per model
    crashed a long-lived process (a segmentation fault after ~20 model loads in the test suite, as others report),
    and each Core loads its plugins again."""
    import openvino as ov

    return ov.Core()


@functools.lru_cache(maxsize=1)
def openvino_unavailable() -> str | None:
    """Why OpenVINO cannot run here (None: it can)."""
    try:
        import openvino  # noqa: F401 - the question is whether it imports
    except ImportError as e:
        return f"the openvino package is not installed ({e.name or e})"
    try:
        if "CPU" not in openvino_core().available_devices:
            return "OpenVINO sees no supported CPU"
    except Exception as e:  # noqa: BLE001 - an unsupported CPU shows up as any error of the plugin
        return f"OpenVINO's CPU plugin does not start ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def example_images(embedder, batch: int = 2) -> torch.Tensor:
    """Random uint8 input at the model's geometry, for tracing (the values do not matter)."""
    size = embedder.preprocess.image_size
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


class ForwardModule(torch.nn.Module):
    """The embedder's forward, or its backbone features: what a runtime converts."""

    def __init__(self, embedder, features: bool):
        super().__init__()
        self.embedder, self.features = embedder, features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.forward_features(images) if self.features else self.embedder(images)


def conversion_key(embedder, runtime: str, features: bool, artifact: str = "fp32") -> dict:
    """What a converted model depends on: the fingerprint, the runtime, the converted precision, the input."""
    size = embedder.preprocess.image_size
    return {"fingerprint": embedder.fingerprint(features), "runtime": runtime,
            "precision": artifact, "input": ["batch", 3, size, size], "input_dtype": "uint8", "features": features}


def convert_to_openvino(embedder, features: bool):
    """ov.convert_model of the model (uint8 [B, 3, S, S] in, dynamic batch); RuntimeUnavailable when it fails."""
    import openvino as ov

    embedder.eval()
    module = ForwardModule(embedder, features).eval()
    size = embedder.preprocess.image_size
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return ov.convert_model(module, example_input=example_images(embedder), input=[(-1, 3, size, size)])
    except Exception as e:  # noqa: BLE001 - the converter's failures have no common type; reported in one line
        raise RuntimeUnavailable(f"OpenVINO cannot convert {embedder.spec.backbone} "
                                 f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})"
                                 ) from None


def openvino_model(embedder, features: bool, cache_dir=None):
    """The model as an `ov.Model`, from the conversion cache or converted now (see `cache.load_or_convert`)."""
    import openvino as ov

    def save(model, folder):
        ov.save_model(model, folder / "model.xml", compress_to_fp16=False)

    def load(folder):
        model = openvino_core().read_model(folder / "model.xml")
        if len(model.inputs) != 1 or model.inputs[0].get_partial_shape()[1:].to_shape() != \
                list(example_images(embedder).shape[1:]):
            raise ValueError("unexpected input shape")
        return model

    return load_or_convert("openvino", conversion_key(embedder, "openvino", features), openvino_version(),
                           lambda: convert_to_openvino(embedder, features), save, load, cache_dir, what="OpenVINO")


def quantized_model(embedder):
    """(the int8 `ov.Model` beside the embedder's checkpoint, the precision hint for its layers left unquantized), as
    `guie.export.quantize` recorded them; one-line errors when there is none for these weights or it cannot be read."""
    checkpoint = getattr(embedder, "checkpoint_path", None)
    if checkpoint is None:
        raise InputError("precision int8 runs a checkpoint's quantized model (made by guie quantize); this model was "
                         "not loaded from a checkpoint file")
    record = quantized_record(embedder)
    folder = quantized_folder(checkpoint)
    if record is None:
        why = "none" if not folder.exists() else "the one there was made from other weights or preprocessing"
        raise InputError(f"precision int8: {checkpoint} has no int8 model of its weights at {folder} ({why}); make "
                         "one with guie quantize")
    try:
        model = openvino_core().read_model(folder / "model.xml")
    except Exception as e:  # noqa: BLE001 - OpenVINO's reader raises one generic type for any damage
        raise InputError(f"precision int8: cannot read the int8 model {folder} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e) else ''}); quantize again") from None
    rest = record.get("rest_precision", "fp32")
    return model, _PRECISION_HINTS["bf16" if rest == "bf16" and cpu_has_native_bf16() else "fp32"]


class OpenVINORuntime(InferenceRuntime):
    """A compiled OpenVINO model on the CPU; see the module docstring for the thread layout."""

    name = "openvino"

    def __init__(self, embedder, precision: str, features: bool, cache_dir=None, streams: int | None = None,
                 chunk: int = 4):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        super().__init__(torch.device("cpu"), features)
        if precision == "bf16" and not cpu_has_native_bf16():
            raise RuntimeUnavailable("precision bf16 needs a CPU with native bf16 (AMX or AVX512-BF16); this one "
                                     "has none (use fp32)")
        self.precision = precision
        threads = torch.get_num_threads()
        self.parallel = max(1, min(streams or threads, threads))
        hint = _PRECISION_HINTS.get(precision)
        if precision == "int8":
            model, hint = quantized_model(embedder)
        else:
            model = openvino_model(embedder, features, cache_dir)
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        model = ppp.build()
        config = {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": self.parallel,
                  "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "THROUGHPUT"}
        self.threads = threads
        try:
            self.compiled = openvino_core().compile_model(model, "CPU", config)
        except Exception as e:  # noqa: BLE001 - the plugin's failures have no common type
            raise RuntimeUnavailable(f"OpenVINO cannot compile {embedder.spec.backbone} for this CPU "
                                     f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
        # `parallel` infer requests, no more: each holds its own activation memory for the chunk size it ran
        self._idle: queue.Queue = queue.Queue()
        for _ in range(self.parallel):
            self._idle.put(self.compiled.create_infer_request())
        self.chunk = max(1, int(chunk))
        self.dim = self.compiled.outputs[0].get_partial_shape()[1].get_length()

    @property
    def layout(self) -> str:
        return (f"{self.parallel} stream(s) x {max(1, self.threads // self.parallel)} thread(s), batches split into "
                f"chunks of <= {self.chunk} over {self.parallel} infer requests")

    def numpy(self, images: torch.Tensor) -> np.ndarray:
        """float32 [B, d] of uint8 images [B, 3, S, S] (any memory layout; channels_last goes in without a copy).

        The batch runs as chunks of at most `chunk` images on the infer requests this call holds: it waits for one
        idle request, takes every other idle one (up to `parallel`), keeps them all busy (start one chunk, wait for
        the oldest, start the next) and hands them back at the end. Waiting releases the GIL and no Python callback
        runs on OpenVINO's threads, so a caller thread that is decoding never delays another caller's requests; a
        call never waits for a second request while holding one, so callers cannot block each other."""
        nhwc = np.ascontiguousarray(images.detach().cpu().permute(0, 2, 3, 1).numpy())
        n = len(nhwc)
        out = np.empty((n, self.dim), np.float32)
        if n == 0:
            return out
        starts = range(0, n, self.chunk)
        held = [self._idle.get()]
        while len(held) < min(self.parallel, len(starts)):
            try:
                held.append(self._idle.get_nowait())
            except queue.Empty:
                break
        free, running = list(held), collections.deque()

        def collect() -> None:
            req, lo = running.popleft()
            req.wait()
            out[lo:lo + self.chunk] = req.get_output_tensor(0).data
            free.append(req)

        try:
            for lo in starts:
                if not free:
                    collect()
                req = free.pop()
                req.start_async({0: nhwc[lo:lo + self.chunk]})
                running.append((req, lo))
            while running:
                collect()
        finally:
            for req, _ in running:  # only after an error: let them finish before they are reused
                try:
                    req.wait()
                except Exception:  # noqa: BLE001,S110 - the error that matters is already propagating
                    pass
            for req in held:
                self._idle.put(req)
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.numpy(images))


def _build(embedder, precision: str, device: torch.device, features: bool, cache_dir=None, forwards=None, **_):
    return OpenVINORuntime(embedder, precision, features, cache_dir, streams=forwards)


register_runtime(RuntimeEntry("openvino", devices=("cpu",), precisions=("fp32", "bf16", "int8"),
                              unavailable=openvino_unavailable, build=_build))
