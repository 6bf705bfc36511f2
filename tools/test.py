#!/usr/bin/env python
"""Evaluate a checkpoint on the config's test (= val) set and print its metrics.

    python tools/test.py configs/vim/vim_tiny_in1k.py vim_t_midclstok_76p1acc.pth \
        --cfg-options test_dataloader.dataset.data_root=/data/imagenet
    python tools/test.py configs/demo/shapes_cls.py work_dirs/shapes_cls/epoch_16.pth
    torchrun --nproc-per-node 8 tools/test.py CONFIG CKPT --launcher pytorch
    python tools/test.py configs/vim/vim_tiny_in1k.py vim_t.pth --compile   # CUDA graphs (GPU: much faster)

The checkpoint may be ours (an mmengine run's ``epoch_N.pth``, whose ``state_dict`` holds the EMA weights
when the run kept an EMA) or, for models that can read them, an official hustvl/Vim ``.pth``. The last
line prints every metric the evaluator returns, e.g. ``top-1: 76.12  top-5: 93.01``.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without install

from vim.engine import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the config's test set.")
    p.add_argument("config", help="config file")
    p.add_argument("checkpoint", help="checkpoint file (ours or official)")
    p.add_argument("--work-dir", help="where logs go (default: work_dirs/<config name>/test)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast for evaluation; auto = bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                   help="torch.compile the model (VimImageClassifier configs); MODE: reduce-overhead (the default: "
                        "CUDA graphs, for the eager model waits for the host), default, max-autotune, "
                        "max-autotune-no-cudagraphs. The last, smaller batch compiles once more")
    p.add_argument("--cfg-options", nargs="+", action=cli.DictAction, metavar="KEY=VALUE",
                   help="override config keys, e.g. test_dataloader.dataset.data_root=/data/imagenet")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_then_close_distributed(lambda: _test(args))


def _test(args) -> int:
    try:
        cfg = cli.load_config(args.config, args.cfg_options)
        if not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        amp = args.amp if args.amp != "auto" else ("bf16" if cli.torch.cuda.is_available() else "off")
        if amp != "off" and not cli.torch.cuda.is_available():
            raise ValueError(f"--amp {amp} needs a GPU")
        if args.compile is not None:
            cli.apply_compile(cfg, args.compile)
    except (FileNotFoundError, cli.ConfigKeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join(
        "work_dirs", osp.splitext(osp.basename(args.config))[0], "test")
    cli.apply_launcher(cfg, args.launcher)
    # Evaluate exactly the weights in the file: no EMA swap, no training state.
    cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") not in ("EMAHook", "RNGStateHook")]
    cfg.load_from = None
    cfg.resume = False
    for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler", "auto_scale_lr"):
        cfg.pop(key, None)
    cfg.test_cfg = dict(type=cfg.get("test_cfg", {}).get("type", "TestLoop"), fp16=False)
    cli.set_cpu_threads(cfg)
    cli.unpin_without_gpu(cfg)

    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    try:
        if hasattr(model, "load_checkpoint_file"):
            model.load_checkpoint_file(args.checkpoint)
        else:
            runner.load_checkpoint(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, RuntimeError) as e:
        runner.logger.error(f"error: {e}")
        return 2
    if amp != "off":
        import torch
        with torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
            metrics = runner.test()
    else:
        metrics = runner.test()
    from mmengine.dist import is_main_process
    if is_main_process():
        print(cli.format_metrics(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
