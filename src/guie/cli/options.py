"""The model options, defined once: every command that runs a model takes the same `--model --device --image-size
--crop-pct --batch-size --runtime --precision`, with the same meaning and defaults, as one typed `ModelOptions`.

A command declares them with the `model_options` decorator and receives `opts: ModelOptions`; what the options mean
lives in the library (`guie.models.embedder.resolve_embedder`, `guie.utils.resolve_device` for "auto",
`guie.embedding.runtimes` for runtime and precision), so a command only passes them on.
`tests/test_cli.py` walks the typer app and fails when a command that runs a model lacks one of them.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import asdict, dataclass
from typing import Optional

import typer

MODEL_OPTION_NAMES = ("model", "device", "image_size", "crop_pct", "batch_size", "runtime", "precision")
RUNTIME_HELP = "what runs the forward: auto (OpenVINO on a CPU, torch on CUDA), torch, openvino or onnxruntime"
PRECISION_HELP = ("auto (fp32 on a CPU unless it has native bf16 and the model passed a bf16 check; bf16 on CUDA), "
                  "fp32, bf16 or int8")


@dataclass(frozen=True)
class ModelOptions:
    """What the shared options say: which model, where and how its forward runs."""

    model: Optional[str] = None
    device: str = "auto"
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    batch_size: int = 64
    runtime: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        from ..embedding.runtimes import check_choice

        check_choice(self.runtime, self.precision)  # an unknown name fails at once, in one line

    def load(self, model=None, **kwargs):
        """The Embedder these options name (`resolve_embedder`; `model` overrides `self.model`)."""
        from ..models.embedder import resolve_embedder

        return resolve_embedder(model if model is not None else self.model, image_size=self.image_size,
                                crop_pct=self.crop_pct, **kwargs)

    @property
    def inference(self) -> dict:
        """device, runtime and precision, as the engine's functions take them."""
        return {"device": self.device, "runtime": self.runtime, "precision": self.precision}

    def as_dict(self, exclude: tuple[str, ...] = ()) -> dict:
        """The options as keyword arguments (the library's functions use the same names)."""
        return {k: v for k, v in asdict(self).items() if k not in exclude}


def model_options(model: str | None = "efficientnet_lite0", model_help: str = "guie checkpoint (.pt) or backbone "
                  "name", with_model: bool = True, batch_size: int = 64, image_size_help: str | None = None,
                  batch_size_flags: tuple[str, ...] = ("--batch-size",), batch_size_help: str = "images per forward",
                  precision: str = "auto"):
    """Decorator: add the shared model options to a typer command, which then receives them as `opts`.

    `model`: the default of --model (None: optional, e.g. "the index's model"; ... : required); with_model=False
    leaves --model out, for a command that takes its models as arguments (`guie benchmark`). `precision`: the
    default of --precision ("fp32" where the command measures the model itself: its scores must not move with the
    CPU it runs on)."""
    def decorate(fn):
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.name != "opts"]
        kw = inspect.Parameter.KEYWORD_ONLY
        shared = []
        if with_model:
            shared.append(inspect.Parameter("model", kw, annotation=Optional[str] if model is None else str,
                                            default=typer.Option(model, "--model", help=model_help)))
        shared += [
            inspect.Parameter("device", kw, annotation=str, default=typer.Option(
                "auto", "--device", help="auto (cuda when there is one, else cpu; $GUIE_DEVICE pins it), cpu, cuda, "
                                         "cuda:1 ...")),
            inspect.Parameter("image_size", kw, annotation=Optional[int], default=typer.Option(
                None, "--image-size", help=image_size_help or "input resolution (default: the model's)")),
            inspect.Parameter("crop_pct", kw, annotation=Optional[float], default=typer.Option(
                None, "--crop-pct", help="centre-crop fraction, 1.0: the whole image (default: the model's)")),
            inspect.Parameter("batch_size", kw, annotation=int, default=typer.Option(
                batch_size, *batch_size_flags, help=batch_size_help)),
            inspect.Parameter("runtime", kw, annotation=str, default=typer.Option(
                "auto", "--runtime", help=RUNTIME_HELP)),
            inspect.Parameter("precision", kw, annotation=str, default=typer.Option(
                precision, "--precision", help=PRECISION_HELP)),
        ]
        names = {p.name for p in shared}

        @functools.wraps(fn)
        def command(*args, **kwargs):
            opts = ModelOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
            return fn(*args, opts=opts, **kwargs)

        command.__signature__ = sig.replace(parameters=params + shared)
        command.__annotations__ = {**{p.name: p.annotation for p in params + shared}}
        command.__model_options__ = True  # what the CLI test looks for
        return command

    return decorate
