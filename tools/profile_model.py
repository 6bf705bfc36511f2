#!/usr/bin/env python
"""Where a model's GPU time goes: torch.profiler over a few inference or training steps, kernels
grouped by name, with their share of the step.

    python tools/profile_model.py vim_tiny --batch-size 256 --mode infer
    python tools/profile_model.py vim_tiny --batch-size 128 --mode train --top 30
    python tools/profile_model.py vim_tiny --set "vim.kernels.selective_scan.triton_scan.CONFIG[BC_PAIR_SPLIT]=False"
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without install
sys.path.insert(1, osp.dirname(osp.abspath(__file__)))  # tools/, for its shared modules (as kernel_sass.py)

import timm  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import vim  # noqa: E402,F401  (registers the vim_* models)
from knobs import add_set_option, resolve_knob  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    add_set_option(p, "the profiled steps")
    args = p.parse_args(argv)
    knobs = [resolve_knob(spec, "--set") for spec in args.set]   # a misspelt knob is an error on any machine
    if not torch.cuda.is_available():
        print("error: profiling needs a CUDA GPU", file=sys.stderr)
        return 2
    for knob in knobs:
        knob.set(knob.value)
    dtype = getattr(torch, args.dtype)
    model = timm.create_model(args.model, img_size=args.img_size).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train(args.mode == "train")

    def step():
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device="cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            if args.mode == "infer":
                with torch.no_grad():
                    model(x)
                return
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in rows)
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    print(f"{args.model} {args.mode} bs {args.batch_size} @ {args.img_size}, {args.dtype}: "
          f"{total / args.steps / 1e3:.2f} ms GPU time per step, {torch.cuda.get_device_name()}"
          + "".join(f"; {k.spec}" for k in knobs))
    print(f"{'share':>6} {'ms/step':>8} {'calls/step':>10}  kernel")
    for e in rows[:args.top]:
        print(f"{100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / args.steps / 1e3:8.3f} "
              f"{e.count / args.steps:10.1f}  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
