"""End-to-end training on the CPU: the demo learns, resume reproduces the uninterrupted run, the
non-finite-loss guard, tools/test.py on an official-format checkpoint."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "data" / "vim_tiny_depth4_official.pt"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_vim_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train_tool():
    return _load_tool("train")


@pytest.fixture(scope="module")
def test_tool():
    return _load_tool("test")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # the CI box has 2 cores; one intra-op thread plus one data worker uses them without oversubscription
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _final_metrics(out: str) -> dict:
    line = [ln for ln in out.strip().splitlines() if ln.startswith("top-1:")][-1]
    return {k: float(v) for k, v in re.findall(r"(\S+): ([0-9.]+)", line)}


# A tiny shapes set and model: 6 classes x 24 images of 16 px, 2 x 2 tokens, ~9 steps per epoch.
def _tiny_options(cache: Path, epochs: int, workers: int = 1):
    opts = [f"train_cfg.max_epochs={epochs}", f"train_cfg.val_interval={epochs}",
            "train_dataloader.batch_size=16", f"train_dataloader.num_workers={workers}",
            "train_dataloader.dataset.transform.input_size=16", "val_dataloader.dataset.transform.input_size=16",
            "model.model_kwargs.img_size=16", "model.model_kwargs.embed_dim=16", "model.model_kwargs.depth=1",
            "model.model_kwargs.drop_path_rate=0.1",  # exercises the RNG in the model too
            f"param_scheduler.1.end={epochs}", f"param_scheduler.1.T_max={epochs - 1}",
            "default_hooks.logger.interval=5"]
    for loader in ("train_dataloader", "val_dataloader"):
        opts += [f"{loader}.dataset.shapes.img_size=16", f"{loader}.dataset.shapes.train_per_class=24",
                 f"{loader}.dataset.shapes.val_per_class=4", f"{loader}.dataset.shapes.cache_dir={cache}"]
    return opts


def _as_argv(options):
    return ["--cfg-options", *options]


def test_demo_learns_shapes(train_tool, tmp_path, capsys):
    """The demo config, shortened: a real accuracy bar on the generated shapes."""
    cache = tmp_path / "cache"
    epochs = 6
    opts = [f"train_cfg.max_epochs={epochs}", f"train_cfg.val_interval={epochs}", f"param_scheduler.1.end={epochs}",
            f"param_scheduler.1.T_max={epochs - 1}", "train_dataloader.batch_size=32",
            "default_hooks.logger.interval=20"]
    for loader in ("train_dataloader", "val_dataloader"):
        opts += [f"{loader}.dataset.shapes.train_per_class=200", f"{loader}.dataset.shapes.val_per_class=50",
                 f"{loader}.dataset.shapes.cache_dir={cache}"]
    rc = train_tool.main(["--work-dir", str(tmp_path / "work"), *_as_argv(opts)])
    assert rc == 0
    metrics = _final_metrics(capsys.readouterr().out)
    assert set(metrics) == {"top-1", "top-5", "ema/top-1", "ema/top-5"}
    # ~220 steps of 32 images (the full demo reaches >= 90%); chance is 16.7%
    assert metrics["top-1"] >= 50.0, metrics
    assert (tmp_path / "work" / f"epoch_{epochs}.pth").is_file()


class _Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(train_tool, tmp_path, capsys):
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module(name="_TestInterruptAfterEpoch", force=True)
    class InterruptAfterEpoch(Hook):
        priority = "LOWEST"  # after the CheckpointHook has saved

        def __init__(self, epoch):
            self.epoch = epoch

        def after_train_epoch(self, runner):
            if runner.epoch + 1 == self.epoch:
                raise _Interrupt()

    cache = tmp_path / "cache"
    opts = _tiny_options(cache, epochs=3)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_tool.main(["--work-dir", str(full), *_as_argv(opts)]) == 0
    ensure_hooks = train_tool.cli.ensure_hooks

    def ensure_hooks_and_interrupt(cfg, types):
        ensure_hooks(cfg, types)
        cfg.custom_hooks = cfg.custom_hooks + [dict(type="_TestInterruptAfterEpoch", epoch=2)]

    train_tool.cli.ensure_hooks = ensure_hooks_and_interrupt
    try:
        with pytest.raises(_Interrupt):
            train_tool.main(["--work-dir", str(part), *_as_argv(opts)])
    finally:
        train_tool.cli.ensure_hooks = ensure_hooks
    assert (part / "epoch_2.pth").is_file() and not (part / "epoch_3.pth").exists()
    # our checkpoints load with torch's default weights_only=True and nothing allow-listed
    torch.load(part / "epoch_2.pth", weights_only=True)
    assert train_tool.main(["--work-dir", str(part), "--resume", *_as_argv(opts)]) == 0

    a = torch.load(full / "epoch_3.pth", weights_only=True)
    b = torch.load(part / "epoch_3.pth", weights_only=True)
    # bit for bit on the CPU; on a GPU the scan backward's atomic sums make every run differ in the last bits
    tol = dict(rtol=1e-4, atol=1e-6) if torch.cuda.is_available() else dict(rtol=0, atol=0)
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], **tol, msg=f"{key}/{k}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], **tol)
    out = capsys.readouterr().out
    finals = [ln for ln in out.splitlines() if ln.startswith("top-1:")]
    assert len(finals) == 2 and finals[0] == finals[1]


# where a checkpoint can be loaded to: mmengine's resume maps it to the GPU when there is one
_MAP_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _MAP_DEVICES)
def test_rng_state_restores_from_a_checkpoint_mapped_to_any_device(tmp_path, device):
    """mmengine's resume loads a checkpoint's tensors onto the GPU; the states must restore from there."""
    import random

    from vim.engine import get_rng_state, set_rng_state

    def draws():
        out = [random.random(), float(np.random.rand()), float(torch.rand(()))]
        if device == "cuda":
            out.append(float(torch.rand((), device="cuda")))
        return out

    if device == "cuda":
        torch.rand((), device="cuda")   # CUDA initialised, so its generators are in the state
    torch.save(get_rng_state(), tmp_path / "rng.pth")
    expected = draws()
    state = torch.load(tmp_path / "rng.pth", weights_only=True, map_location=device)
    set_rng_state(state)
    assert draws() == expected


@pytest.mark.parametrize("device", _MAP_DEVICES)
def test_message_hub_restores_from_a_checkpoint_mapped_to_any_device(tmp_path, device):
    from mmengine.logging import HistoryBuffer

    from vim.engine.checkpoint_io import WeightsOnlyCheckpointHook

    buf = HistoryBuffer()
    for v in (0.5, 0.25, 2.0):
        buf.update(v)
    checkpoint = {"message_hub": {"log_scalars": {"train/loss": buf}, "runtime_info": {"epoch": np.int64(2)}}}
    hook = WeightsOnlyCheckpointHook()
    hook.before_save_checkpoint(None, checkpoint)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True, map_location=device)
    hook.after_load_checkpoint(None, loaded)
    restored = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(restored, HistoryBuffer)
    assert restored.data[0].tolist() == [0.5, 0.25, 2.0] and restored.mean() == buf.mean()
    assert loaded["message_hub"]["runtime_info"]["epoch"] == 2


def test_non_finite_loss_is_skipped_then_stops():
    import vim.engine  # noqa: F401
    from mmengine.registry import OPTIM_WRAPPERS

    model = torch.nn.Linear(3, 2)
    ow = OPTIM_WRAPPERS.build(dict(type="GuardedOptimWrapper", max_nonfinite=3,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    before = model.weight.detach().clone()
    ow.update_params(model(torch.full((1, 3), float("nan"))).sum())
    torch.testing.assert_close(model.weight.detach(), before)  # skipped
    assert model.weight.grad is None or not model.weight.grad.abs().sum()
    ow.update_params(model(torch.ones(1, 3)).sum())  # a good step resets the count
    assert ow.nonfinite_in_row == 0 and not torch.equal(model.weight.detach(), before)
    ow.update_params(model(torch.full((1, 3), float("inf"))).sum())
    ow.update_params(model(torch.full((1, 3), float("inf"))).sum())
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        ow.update_params(model(torch.full((1, 3), float("nan"))).sum())


def test_cfg_option_typo_is_a_clear_error(train_tool, capsys):
    assert train_tool.main(["--cfg-options", "train_cfg.max_epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "no key 'max_epoch'" in err and "max_epochs" in err


def test_missing_data_dir_is_a_clear_error(train_tool, tmp_path, capsys):
    cfg = REPO / "configs" / "vim" / "vim_tiny_in1k.py"
    rc = train_tool.main([str(cfg), "--work-dir", str(tmp_path / "w"), "--cfg-options",
                          f"train_dataloader.dataset.data_root={tmp_path / 'nowhere'}",
                          "model.model_kwargs.depth=1"])
    assert rc == 2
    assert "data folder not found" in capsys.readouterr().err


def _photo_from_oracle(oracle):
    """The oracle's last input (a real photo, ImageNet-normalised 224x224) back to an RGB image."""
    from PIL import Image
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (oracle["input"][-1] * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_test_tool_on_official_checkpoint(test_tool, tmp_path, capsys, monkeypatch, compile_mode):
    """tools/test.py evaluates an official-format {'model': state_dict} file on a tiny ImageFolder whose
    labels are the official model's own top-1 and 5th-ranked class for the photo. With ``--compile`` (torch.compile
    stubbed: the wiring, not Inductor) the classifier runs its timm model through it."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: (compiled.append(kwargs), model)[1])
    oracle = torch.load(ORACLE, weights_only=False)
    ckpt = tmp_path / "vim_t_depth4_official.pth"
    torch.save({"model": oracle["state_dict"], "epoch": 299}, ckpt)
    ranked = oracle["logits"][-1].topk(5).indices.tolist()
    photo = _photo_from_oracle(oracle)
    for name in ("top1", "fifth"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        photo.save(tmp_path / "data" / "val" / name / "photo.png")
    cfg = tmp_path / "eval_cfg.py"
    cfg.write_text(
        f"_base_ = [{str(REPO / 'configs' / 'vim' / 'vim_tiny_in1k.py')!r}]\n"
        "model = dict(model_kwargs=dict(depth=4))\n"
        "test_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(\n"
        f"    data_root={str(tmp_path / 'data')!r}, classes={{'top1': {ranked[0]}, 'fifth': {ranked[4]}}},\n"
        "    transform=dict(input_size=224, is_training=False, crop_pct=1.0, interpolation='bicubic')))\n")
    flags = ["--compile", compile_mode] if compile_mode else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "--compile without a GPU")
        rc = test_tool.main([str(cfg), str(ckpt), "--work-dir", str(tmp_path / "w"), *flags])
    assert rc == 0
    metrics = _final_metrics(capsys.readouterr().out)
    assert metrics == {"top-1": 50.0, "top-5": 100.0}
    assert compiled == ([dict(mode=compile_mode)] if compile_mode else [])
    if compile_mode:
        rc = test_tool.main([str(cfg), str(ckpt), "--work-dir", str(tmp_path / "w"), "--compile", "fast"])
        assert rc == 2 and "--compile fast: expected one of" in capsys.readouterr().err


def test_test_tool_rejects_other_architecture(test_tool, tmp_path, capsys):
    oracle = torch.load(ORACLE, weights_only=False)
    ckpt = tmp_path / "official.pth"
    torch.save({"model": oracle["state_dict"]}, ckpt)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    _photo_from_oracle(oracle).save(tmp_path / "data" / "val" / "a" / "x.png")
    rc = test_tool.main([str(REPO / "configs" / "vim" / "vim_small_in1k.py"), str(ckpt), "--work-dir",
                         str(tmp_path / "w"), "--cfg-options", "model.model_kwargs.depth=4",
                         f"test_dataloader.dataset.data_root={tmp_path / 'data'}"])
    assert rc == 2


def test_ddp_two_cpu_processes(tmp_path):
    """The demo pipeline under torchrun with 2 gloo processes: repeated-augmentation sampler, the
    all-reduced non-finite guard, rank-0 data generation with the others waiting, metric gathering."""
    import socket
    import subprocess
    cache = tmp_path / "cache"
    opts = _tiny_options(cache, epochs=2, workers=0) + ["train_dataloader.batch_size=8",
                                                         "train_dataloader.sampler.num_repeats=3"]
    # CPU processes also on a GPU machine (two ranks on one GPU is not a layout NCCL accepts); the caller's
    # PYTHONPATH, where mmengine may be, is kept
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    with socket.socket() as s:  # a free port: a fixed one collides with any other job on the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           str(REPO / "tools" / "train.py"), "--launcher", "pytorch", "--work-dir", str(tmp_path / "w"),
           *_as_argv(opts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _final_metrics(proc.stdout)
    assert 0.0 <= metrics["top-1"] <= 100.0 and (tmp_path / "w" / "epoch_2.pth").is_file()
    assert "VimRepeatAugSampler" in (tmp_path / "w" / "shapes_cls.py").read_text()


def test_tools_leave_the_process_group(train_tool, test_tool, tmp_path, capsys):
    """train.py and test.py close the group they joined, also on an error return: left to interpreter exit,
    gloo's threads can abort a finished run (SIGABRT on one rank; seen in CI on test_ddp_two_cpu_processes)."""
    import torch.distributed as dist
    from vim.engine import cli
    runs = [lambda: train_tool.main(["--work-dir", str(tmp_path / "w"), "--resume"]),  # nothing to resume
            lambda: test_tool.main([str(cli.DEMO_CONFIG), str(tmp_path / "missing.pth")])]
    for i, run in enumerate(runs):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"store{i}"), 1), rank=0, world_size=1)
        assert run() == 2
        assert not dist.is_initialized()
    cli.close_distributed()  # without a group: nothing to do


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies midway leaves the previous file whole and no temporary file behind."""
    from mmengine.fileio.backends import LocalBackend

    import vim.engine  # noqa: F401  (installs the atomic put)
    target = tmp_path / "epoch_1.pth"
    LocalBackend().put(b"old checkpoint", str(target))

    def crash(fd):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        LocalBackend().put(b"new, half written", str(target))
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_1.pth"]


def test_cli_errors(train_tool, tmp_path, capsys):
    assert train_tool.main(["--work-dir", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_tool.main(["--amp", "bf16"]) == 2
        assert "needs a GPU" in capsys.readouterr().err
    assert train_tool.main([str(tmp_path / "nope.py")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_amp_flag_switches_any_optim_wrapper(monkeypatch):
    from mmengine.config import Config

    from vim.engine import cli
    cfg = Config(dict(optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3))))
    assert cli.apply_amp(cfg, "off") == "off" and cfg.optim_wrapper.type == "GuardedOptimWrapper"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.apply_amp(cfg, "auto") == "bf16"
    assert cfg.optim_wrapper.type == "GuardedAmpOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"
    cli.apply_amp(cfg, "fp16")
    assert cfg.optim_wrapper.dtype == "float16"
    cli.apply_amp(cfg, "off")
    assert cfg.optim_wrapper.type == "GuardedOptimWrapper" and "dtype" not in cfg.optim_wrapper


def test_compile_flag_sets_the_classifier_compile_cfg(train_tool, tmp_path):
    from mmengine.config import Config

    from vim.engine import cli
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, _ = train_tool.build_cfg(train_tool.parse_args(["--work-dir", str(tmp_path), "--compile"]))
        assert cfg.model.compile_cfg == dict(mode="reduce-overhead")
        cfg, _ = train_tool.build_cfg(train_tool.parse_args(["--work-dir", str(tmp_path), "--compile", "default"]))
        assert cfg.model.compile_cfg == {}
    assert any("without a GPU" in str(w.message) for w in caught) != torch.cuda.is_available()
    with pytest.raises(ValueError, match="a config goes before --compile"):
        train_tool.build_cfg(train_tool.parse_args(["--compile", "configs/vim/vim_tiny_in1k.py"]))
    with pytest.raises(ValueError, match="applies to VimImageClassifier"):
        cli.apply_compile(Config(dict(model=dict(type="VimSegmentor"))), "reduce-overhead")


def test_compiled_classifier_matches_eager_and_keeps_its_keys():
    """``compile_cfg`` (dynamo's eager backend here: the tracing without code generation) gives the eager model's
    loss and gradients, leaves the state dict's keys alone, and a deep copy (mmengine's EMA model) compiles its own
    model instead of running the original's weights."""
    import copy

    import vim.engine  # noqa: F401  (registers the classifier)
    from vim.engine.classifier import VimImageClassifier
    torch.manual_seed(0)
    kw = dict(num_classes=3, img_size=16, patch_size=8, stride=8, embed_dim=16, depth=1, d_state=4,
              global_pool="avg", drop_path_rate=0.0)
    compiled = VimImageClassifier("vim_tiny", model_kwargs=kw, label_smoothing=0.1,
                                  compile_cfg=dict(backend="eager"))
    eager = VimImageClassifier("vim_tiny", model_kwargs=kw, label_smoothing=0.1)
    eager.load_state_dict(compiled.state_dict())
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    losses = [m(x, y, mode="loss")["loss"] for m in (compiled, eager)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert compiled._compiled is not None and list(compiled.state_dict()) == list(eager.state_dict())
    twin = copy.deepcopy(compiled)
    assert twin._compiled is None
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
        expect = copy.deepcopy(eager)
        for p in expect.parameters():
            p.add_(0.01)
        torch.testing.assert_close(twin(x, mode="tensor"), expect(x, mode="tensor"), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled(x, mode="tensor"), eager(x, mode="tensor"), rtol=1e-6, atol=1e-6)
    assert twin._compiled is not None and twin._compiled is not compiled._compiled


def test_imagenet_recipe_trains_on_uint8_batches(train_tool, tmp_path, capsys, monkeypatch):
    """The ImageNet config's pipeline end to end, on a tiny ImageFolder and a 1-block model: the workers' uint8
    images are normalised and erased by VimClsDataPreprocessor, then mixed up; the steps' losses are finite and
    validation runs on uint8 batches too."""
    from PIL import Image

    from vim.engine import ClsDataPreprocessor

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c in range(2):
            folder = tmp_path / "data" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    seen = []
    forward = ClsDataPreprocessor.forward

    def recording(self, data, training=False):
        seen.append((data["inputs"].dtype, training))
        out = forward(self, data, training)
        assert out["inputs"].dtype == torch.float32
        return out

    monkeypatch.setattr(ClsDataPreprocessor, "forward", recording)
    data = tmp_path / "data"
    rc = train_tool.main([str(REPO / "configs" / "vim" / "vim_tiny_in1k.py"), "--work-dir", str(tmp_path / "w"),
                          "--cfg-options", f"train_dataloader.dataset.data_root={data}",
                          f"val_dataloader.dataset.data_root={data}", "train_dataloader.batch_size=4",
                          "train_dataloader.num_workers=0", "val_dataloader.batch_size=4",
                          "val_dataloader.num_workers=0", "train_cfg.max_epochs=1",
                          "model.model_kwargs.depth=1", "model.model_kwargs.embed_dim=32",
                          "model.model_kwargs.num_classes=2", "default_hooks.logger.interval=1"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert (torch.uint8, True) in seen and (torch.uint8, False) in seen
    assert all(dtype == torch.uint8 for dtype, _ in seen)
    losses = [float(v) for v in re.findall(r"\bloss: ([0-9.naif]+)", out.out + out.err)]
    assert len(losses) >= 3 and all(np.isfinite(losses))
