#!/usr/bin/env python
"""Train (and validate) a model from a python config with mmengine's Runner.

    python tools/train.py                                  # the built-in demo: small Vim on generated shapes
    python tools/train.py configs/vim/vim_tiny_in1k.py --work-dir work_dirs/vim_t
    python tools/train.py CONFIG --resume                  # continue from the work dir's last checkpoint
    python tools/train.py CONFIG --compile                 # torch.compile with CUDA graphs (GPU: much faster)
    torchrun --nproc-per-node 8 tools/train.py CONFIG --launcher pytorch
    srun -N 2 --ntasks-per-node 8 --gpus-per-node 8 python tools/train.py CONFIG --launcher slurm

Task-agnostic: model, data and evaluator come from the config. Logs go to the console, a log file and
TensorBoard under the work dir; the last line prints the final validation metrics (``top-1: ..``).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without install

from vim.engine import cli  # noqa: E402  (also registers the vim.engine classes)
from vim.engine.checkpoint_io import find_resume_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a model from a config (default: the shapes demo).")
    p.add_argument("config", nargs="?", default=None, help=f"config file (default: {osp.relpath(cli.DEMO_CONFIG)})")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT, or without a value from the work dir's latest checkpoint")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype; auto = bf16 on a GPU, fp32 (off) on the CPU")
    p.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                   help="torch.compile the model; MODE: reduce-overhead (the default: CUDA graphs, for the eager "
                        "model's host overhead), default, max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--cfg-options", nargs="+", action=cli.DictAction, metavar="KEY=VALUE",
                   help="override config keys, e.g. train_cfg.max_epochs=10 train_dataloader.batch_size=64")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                   help="job launcher for multi-process training (torchrun: pytorch)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters with FSDP through mmengine's FlexibleRunner (large models)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def build_cfg(args):
    config = args.config or cli.DEMO_CONFIG
    cfg = cli.load_config(config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join(
        "work_dirs", osp.splitext(osp.basename(config))[0])
    cli.apply_launcher(cfg, args.launcher)
    amp = cli.apply_amp(cfg, args.amp)
    if args.compile is not None:
        cli.apply_compile(cfg, args.compile)
    cli.ensure_hooks(cfg, ["RNGStateHook", "LastMetricsHook", "WeightsOnlyCheckpointHook"])
    if args.resume is not None:
        ckpt = find_resume_checkpoint(cfg.work_dir) if args.resume == "auto" else args.resume
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.work_dir} (pass --work-dir of the run "
                                    "to continue, or a checkpoint path: --resume path/epoch_3.pth)")
        if not osp.isfile(ckpt):
            raise FileNotFoundError(f"--resume: checkpoint not found: {ckpt}")
        cfg.resume = True
        cfg.load_from = ckpt
    return cfg, amp


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_then_close_distributed(lambda: _train(args))


def _train(args) -> int:
    try:
        cfg, amp = build_cfg(args)
    except (FileNotFoundError, cli.ConfigKeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = cli.set_cpu_threads(cfg)
    cli.unpin_without_gpu(cfg)

    if args.fsdp:
        from mmengine.runner._flexible_runner import FlexibleRunner
        cfg.strategy = cfg.get("strategy", dict(type="FSDPStrategy"))
        runner = FlexibleRunner.from_cfg(cfg)
    else:
        from mmengine.runner import Runner
        runner = Runner.from_cfg(cfg)
    runner.logger.info(f"mixed precision: {amp}" + (f"; CPU threads: {threads}" if threads else ""))
    try:
        runner.train()
    except FloatingPointError as e:
        runner.logger.error(str(e))
        return 1
    except (FileNotFoundError, ValueError) as e:
        if "data folder" in str(e) or "class folder" in str(e) or "no class folders" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    metrics = runner.message_hub.get_info("last_val_metrics")
    if not metrics and getattr(runner, "_val_loop", None) is not None:
        metrics = runner.val()
    if metrics:
        from mmengine.dist import is_main_process
        if is_main_process():
            print(cli.format_metrics(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
