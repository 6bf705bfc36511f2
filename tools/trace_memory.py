#!/usr/bin/env python
"""Which activations are alive at the peak of a vim model's inference forward, on a machine without a GPU.

    python tools/trace_memory.py                                  # vim_tiny, batch 2 at 64 px, 3 blocks
    python tools/trace_memory.py vim_small --img-size 96 --depth 4 --json mem.json

How: the model runs on CPU tensors along CUDA's code path (the fused Triton mixer and add + norm, their kernels
run by the Triton interpreter), under bf16 autocast and ``torch.inference_mode`` as ``tools/benchmark.py``
infers. A ``TorchDispatchMode`` sees every tensor an op returns and keeps a weak reference to it; a storage is
alive while one of its tensors is. The mixer's forward ops are run through their implementations under the same
mode, so the tensors inside them are seen too. Only activations count: tensors whose first dimension is the batch or
batch x tokens (not the weights, not autocast's weight copies). The unit is one (B, L, E) tensor in bf16, E the
mixer's width: the peak in those units does not depend on the batch or the image size, and at 1248 px and batch
8 one unit of vim_tiny is 37.4 MB. The CUDA caching allocator adds its rounding and the input image to what the
GPU reports, so this counts the model's share of the peak, not ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import weakref
from typing import Dict, List

# before triton is imported: the kernels run on CPU tensors. Where triton is already imported (the tool loaded as a
# module) its kernels are defined, so the variable would only split them from later ones: the process's own setting
# stands, and trace() says what to do if it compiled them.
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without install

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import vim  # noqa: E402,F401  (registers the vim_* models)
from vim.kernels.bimamba import triton_bimamba  # noqa: E402
from vim.kernels.norm import interface as norm_interface  # noqa: E402
from vim.kernels.selective_scan import triton_scan  # noqa: E402


class LiveActivations(TorchDispatchMode):
    """Bytes of the activation storages alive after each op, and what was alive at the largest total."""

    def __init__(self, first_dims):
        super().__init__()
        self.first_dims = set(first_dims)
        self.live: Dict[int, list] = {}     # storage address -> [bytes, label, weak refs of its tensors]
        self.peak = 0
        self.at_peak: List[tuple] = []
        self.peaks: Dict[str, int] = {}     # the largest total while each part of the model ran
        self.where = "stem"
        self.made = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = _OP_IMPLS.get(func)
        if impl is not None:   # a mixer op: run its implementation under this mode, to see the tensors inside it
            with self:
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.live:
                if t.dim() < 2 or t.shape[0] not in self.first_dims:
                    continue
                self.made += 1
                self.live[key] = [t.untyped_storage().nbytes(),
                                  f"#{self.made} {self.where}: {func.__name__} {tuple(t.shape)} {t.dtype}", []]
            self.live[key][2].append(weakref.ref(t))
        for key in list(self.live):
            refs = [r for r in self.live[key][2] if r() is not None]
            if refs:
                self.live[key][2] = refs
            else:
                del self.live[key]
        total = sum(v[0] for v in self.live.values())
        self.peaks[self.where] = max(self.peaks.get(self.where, 0), total)
        if total > self.peak:
            self.peak = total
            self.at_peak = [(v[0], v[1]) for v in self.live.values()]
        return out


# the mixer's forward ops, whose insides the trace follows
_OP_IMPLS = {torch.ops.vim_kernels.bimamba_v2_fwd.default: triton_bimamba._fwd_op,
             torch.ops.vim_kernels.bimamba_v2_fwd_into_x_.default: triton_bimamba._fwd_into_x_op}


@contextlib.contextmanager
def _cuda_code_path(model, tracer):
    """The Triton norm on CPU tensors (the model's mixer takes scan_backend="triton"), and each block's index in
    the labels."""
    saved = norm_interface.resolve_backend
    norm_interface.resolve_backend = lambda backend, device, err: "triton"
    for i, blk in enumerate(model.blocks):
        def labelled(carry, i=i, run=blk.forward_carry):
            tracer.where = f"block {i}"
            return run(carry)
        blk.forward_carry = labelled
    try:
        yield
    finally:
        norm_interface.resolve_backend = saved
        for blk in model.blocks:
            del blk.forward_carry


def trace(model_name: str = "vim_tiny", batch: int = 2, img_size: int = 64, **model_kwargs) -> dict:
    """The peak of live activation bytes through one inference forward, in bytes and in (B, L, E) bf16 units,
    and the tensors alive there (largest first); also the peak while the blocks ran (the stem's can be larger for a tiny
    model, whose image is large against its tokens) and per part of the model."""
    if not triton_scan._interpreted():
        raise RuntimeError("trace_memory runs the Triton kernels in the interpreter, on CPU tensors, but this process "
                           "imported triton before TRITON_INTERPRET=1 was set (its kernels are compiled for the GPU): "
                           "run `python tools/trace_memory.py` as a script, or set the variable before importing triton")
    model = timm.create_model(model_name, img_size=img_size, scan_backend="triton", **model_kwargs).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        tokens = model._pos_embed(model.patch_embed(x)).shape[1]
    unit = batch * tokens * model.blocks[0].mixer.d_inner * 2
    tracer = LiveActivations((batch, batch * tokens))
    with _cuda_code_path(model, tracer), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with tracer:
            model(x)
    live = sorted(tracer.at_peak, key=lambda v: -v[0])
    blocks = max(v for k, v in tracer.peaks.items() if k.startswith("block"))
    return {"model": model_name, "batch": batch, "img_size": img_size, "tokens": tokens, "unit_bytes": unit,
            "peak_bytes": tracer.peak, "peak_units": tracer.peak / unit, "blocks_peak_units": blocks / unit,
            "peak_units_by_part": {k: v / unit for k, v in tracer.peaks.items()},
            "at_peak": [{"units": n / unit, "tensor": label} for n, label in live]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="vim_tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3, help="blocks (every block after the first repeats the second)")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args(argv)
    r = trace(args.model, args.batch, args.img_size, depth=args.depth)
    print(f"{r['model']} at {r['img_size']} px, batch {r['batch']}, {r['tokens']} tokens: peak of live activations "
          f"{r['peak_bytes']:,} bytes = {r['peak_units']:.2f} x (B, L, E) bf16; in the blocks "
          f"{r['blocks_peak_units']:.2f}. Alive at the peak:")
    for item in r["at_peak"]:
        print(f"{item['units']:6.2f}  {item['tensor']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
