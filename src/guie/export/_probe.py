"""Run an exported model the way a consumer would: in a fresh interpreter that can import only torch / onnxruntime.

`guie check-submission` starts this file by path (`python -I _probe.py ...`); it must not import guie. Imports of
guie, timm and open_clip are blocked, so a model that secretly needs them fails here rather than at the consumer's.
Reads named uint8 images from an .npz, writes results.json and outputs.npz into --out.
"""
import argparse
import importlib.abc
import json
import sys
import time
import traceback

BLOCKED = ("guie", "timm", "open_clip")
attempted = []


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempted.append(name)
            raise ImportError(f"{name} is not available to an exported model (blocked by guie check-submission)")
        return None


sys.meta_path.insert(0, _Blocker())

import numpy as np  # noqa: E402


def _error(e):
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


class Runner:
    """Calls a TorchScript or ONNX model on uint8 numpy images [3,H,W] or [B,3,H,W] -> float output (numpy)."""

    def __init__(self, path, device):
        self.device = device
        if path.endswith(".onnx"):
            import onnxruntime as ort

            self.backend = "onnx"
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
                ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(path, providers=providers)
            self.input_name = self.session.get_inputs()[0].name
        else:
            import torch

            self.backend = "torchscript"
            self.torch = torch
            self.model = torch.jit.load(path, map_location=device).eval()

    def __call__(self, x, as_float=False):
        if self.backend == "onnx":
            if x.ndim == 3:
                x = x[None]
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
            return np.asarray(out), str(np.asarray(out).dtype)
        torch = self.torch
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if as_float:
            t = t.float() / 255.0
        with torch.inference_mode():
            out = self.model(t)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().cpu().numpy(), str(out.dtype).replace("torch.", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-runs", type=int, default=5)
    args = ap.parse_args()
    res = {"python": sys.version.split()[0], "device": args.device}
    outputs = {}

    def dump():
        with open(f"{args.out}/results.json", "w") as f:
            json.dump(res, f, indent=2)
        np.savez(f"{args.out}/outputs.npz", **outputs)

    t0 = time.perf_counter()
    try:
        runner = Runner(args.model, args.device)
        res["backend"] = runner.backend
        res["load_seconds"] = time.perf_counter() - t0
    except Exception as e:
        res["load_error"] = _error(e)
        res["blocked_imports"] = attempted
        dump()
        return
    images = dict(np.load(args.inputs))
    runs = {}
    for name, x in images.items():
        try:
            out, dtype = runner(x)
            outputs[name] = out
            runs[name] = {"input_shape": list(x.shape), "shape": list(out.shape), "dtype": dtype,
                          "finite": bool(np.isfinite(out).all()), "error": None}
        except Exception as e:
            runs[name] = {"input_shape": list(x.shape), "error": _error(e)}
    res["runs"] = runs
    singles = [n for n in images if images[n].ndim == 3 and runs[n]["error"] is None]

    if runner.backend == "torchscript" and singles:
        name = singles[0]  # [3,H,W] and [1,3,H,W] must agree; float in [0,1] must read like uint8
        try:
            out4, _ = runner(images[name][None])
            res["rank4_vs_rank3_max_abs"] = float(np.abs(out4 - outputs[name]).max())
        except Exception as e:
            res["rank4_error"] = _error(e)
        try:
            outf, _ = runner(images[name], as_float=True)
            res["float_input_max_abs"] = float(np.abs(outf - outputs[name]).max())
        except Exception as e:
            res["float_input_error"] = _error(e)
    if singles:
        try:
            again, _ = runner(images[singles[0]])
            res["determinism_max_abs"] = float(np.abs(again - outputs[singles[0]]).max())
        except Exception as e:
            res["determinism_error"] = _error(e)
    batches = [n for n in images if images[n].ndim == 4 and runs[n]["error"] is None]
    diffs = []
    for name in batches:  # each row of a batch against the same image alone
        x = images[name]
        try:
            rows = np.concatenate([runner(x[i])[0] for i in range(len(x))])
            diffs.append(float(np.abs(rows - outputs[name]).max()))
        except Exception as e:
            res["batch_error"] = _error(e)
    if diffs:
        res["batch_vs_single_max_abs"] = max(diffs)
    if args.latency_runs > 0:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)
        try:
            for _ in range(3):  # warm-up (TorchScript's profiling executor optimises after the first calls)
                runner(x)
            times = []
            for _ in range(args.latency_runs):
                t = time.perf_counter()
                runner(x)
                times.append(time.perf_counter() - t)
            threads = None
            if runner.backend == "torchscript":
                threads = runner.torch.get_num_threads()
            res["latency"] = {"median_ms": 1000 * float(np.median(times)), "runs": len(times),
                              "image": "640x480", "batch": 1, "threads": threads}
        except Exception as e:
            res["latency_error"] = _error(e)
    res["blocked_imports"] = attempted
    dump()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(3)
