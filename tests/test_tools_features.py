"""tools/extract_features.py: features equal the model's own pooled embedding, --layers shapes,
bad inputs reported and skipped, output and checkpoint errors."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vim  # noqa: F401  (registers vim_*)
from vim import inference as inf
from tool_loading import load_tool

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, embed_dim=64, patch_size=8, stride=8)
KW = ["--model-kwargs"] + [f"{k}={v}" for k, v in TINY.items()]


tool = load_tool("extract_features")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An ImageFolder tree of differently sized images, one corrupt file, and a tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    root = tmp / "images"
    sizes = {"cat/0.png": (40, 52), "cat/1.jpg": (64, 64), "dog/2.png": (33, 70), "dog/3.png": (32, 32)}
    for name, (w, h) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny", img_size=32, num_classes=10, **TINY).eval()
    ckpt = tmp / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return root, ckpt, model, sorted(sizes)


def _run(args, capsys):
    rc = tool.main([*args, "--device", "cpu", "--workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err


def _reference_input(model, root, names, img_size=None):
    cfg = inf.data_config(model, img_size=img_size)
    transform = inf.eval_transform(cfg)
    return torch.stack([transform(Image.open(root / n).convert("RGB")) for n in names])


def test_pooled_features_match_model_and_corrupt_skipped(setup, tmp_path, capsys):
    root, ckpt, model, names = setup
    out = tmp_path / "f.safetensors"
    # one worker process: errors must come back from workers too
    rc = tool.main(["vim_tiny", *KW, "--img-size", "32", "--num-classes", "10", "--checkpoint", str(ckpt),
                    "--input", str(root), "--out", str(out), "--batch-size", "3", "--workers", "1",
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1  # corrupt file reported, the rest written
    assert "corrupt.png" in err and "1 input(s) could not be processed" in err
    feats, got_names = inf.load_features(str(out))
    assert got_names == names
    x = _reference_input(model, root, names)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert list(feats) == ["pre_logits"]
    torch.testing.assert_close(feats["pre_logits"], expected, rtol=1e-4, atol=1e-5)


def test_layers_shapes_and_values_at_other_resolution(setup, tmp_path, capsys):
    root, ckpt, model, names = setup
    out = tmp_path / "maps.npz"
    rc, err = _run(["vim_tiny", *KW, "--img-size", "48", "--num-classes", "10", "--checkpoint", str(ckpt),
                    "--input", str(root / "cat"), str(root / "dog" / "2.png"), "--out", str(out),
                    "--layers", "0", "-1", "--pooled"], capsys)
    assert rc == 0, err
    feats, got_names = inf.load_features(str(out))
    assert got_names == ["0.png", "1.jpg", str(root / "dog" / "2.png")]
    # documented: layer{i} (N, D, H/stride, W/stride) NCHW maps, pre_logits (N, D)
    assert feats["layer0"].shape == (3, 64, 6, 6)
    assert feats["layer1"].shape == (3, 64, 6, 6)
    assert feats["pre_logits"].shape == (3, 64)
    # the checkpoint (32 px grid) was interpolated onto a model built at 48 px
    big = inf.build_model("vim_tiny", checkpoint=str(ckpt), num_classes=10, img_size=48, model_kwargs=TINY)
    x = _reference_input(big, root, ["cat/0.png", "cat/1.jpg", "dog/2.png"], img_size=48)
    assert x.shape[-1] == 48
    with torch.no_grad():
        maps = big.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        pooled = big.forward_head(big.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats["layer0"], maps[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["layer1"], maps[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["pre_logits"], pooled, rtol=1e-4, atol=1e-5)


def test_keep_size_and_npy(setup, tmp_path, capsys):
    root, ckpt, model, names = setup
    out = tmp_path / "f.npy"
    rc, err = _run(["vim_tiny", *KW, "--num-classes", "0", "--checkpoint", str(ckpt), "--keep-size",
                    "--input", str(root / "cat"), "--out", str(out)], capsys)
    assert rc == 0, err
    arr = np.load(out)
    assert arr.shape == (2, 64)
    assert (tmp_path / "f.npy.names.txt").read_text().splitlines() == ["0.png", "1.jpg"]
    rc, err = _run(["vim_tiny", *KW, "--keep-size", "--layers", "1", "--input", str(root / "cat"),
                    "--out", str(tmp_path / "m.safetensors")], capsys)
    assert rc == 0, err
    feats, _ = inf.load_features(str(tmp_path / "m.safetensors"))
    # mixed sizes cannot be stacked: one map per image, padded up to whole 8 px patches
    assert feats["layer1.0"].shape == (64, 7, 5) and feats["layer1.1"].shape == (64, 8, 8)


def test_refuses_existing_output_and_bad_checkpoint(setup, tmp_path, capsys):
    root, ckpt, _, _ = setup
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"keep me")
    rc, err = _run(["vim_tiny", *KW, "--input", str(root), "--out", str(out)], capsys)
    assert rc == 2 and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    rc, err = _run(["vim_tiny", "--model-kwargs", "depth=3", "embed_dim=64", "patch_size=8", "stride=8",
                    "--img-size", "32", "--num-classes", "10", "--checkpoint", str(ckpt),
                    "--input", str(root), "--out", str(out), "--overwrite"], capsys)
    assert rc == 2 and "does not fit" in err and "blocks.2." in err
    rc, err = _run(["vim_tiny", *KW, "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "g.npz")], capsys)
    assert rc == 2 and "no such file" in err and not (tmp_path / "g.npz").exists()


def test_any_timm_model(tmp_path, capsys):
    """Not only vim: a timm ViT (with --layers through the same forward_intermediates API)."""
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    kwargs = dict(depth=2, embed_dim=48, num_heads=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, **kwargs).eval()
    ckpt = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.state_dict()}, ckpt)
    out = tmp_path / "vit.safetensors"
    # the checkpoint's 2x2 position embedding is resampled to 3x3 by timm's ViT checkpoint filter
    rc, err = _run(["vit_tiny_patch16_224", "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
                    "--checkpoint", str(ckpt), "--img-size", "48", "--input", str(root), "--out", str(out),
                    "--layers", "1", "--pooled"], capsys)
    assert rc == 0, err
    feats, names = inf.load_features(str(out))
    assert names == ["red.png"] and feats["layer1"].shape == (1, 48, 3, 3)
    big = inf.build_model("vit_tiny_patch16_224", checkpoint=str(ckpt), img_size=48, model_kwargs=kwargs)
    x = _reference_input(big, root, ["red.png"], img_size=48)
    with torch.no_grad():
        expected = big.forward_head(big.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats["pre_logits"], expected, rtol=1e-4, atol=1e-5)
    # a checkpoint of another depth is refused, with the keys named
    with pytest.raises(inf.CheckpointMismatchError, match="unexpected keys: blocks.1"):
        inf.build_model("vit_tiny_patch16_224", checkpoint=str(ckpt), img_size=32,
                        model_kwargs=dict(kwargs, depth=1))


def test_official_checkpoint_features_match_oracle(tmp_path, capsys):
    """The official-format oracle checkpoint through the tool gives the official model's features
    for its real photo (saved as a 224 px PNG; --crop-pct 1.0 passes it through unchanged)."""
    oracle = torch.load(ROOT / "tests" / "data" / "vim_tiny_depth4_official.pt", weights_only=False)
    ckpt = tmp_path / "official.pth"
    torch.save({"model": oracle["state_dict"]}, ckpt)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    img = (oracle["input"][-1] * std + mean).clamp(0, 1)
    png = tmp_path / "photo.png"
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(png)
    out = tmp_path / "f.safetensors"
    rc, err = _run(["vim_tiny", "--model-kwargs", "depth=4", "--checkpoint", str(ckpt), "--crop-pct", "1.0",
                    "--input", str(png), "--out", str(out)], capsys)
    assert rc == 0, err
    feats, names = inf.load_features(str(out))
    assert names == [str(png)]
    # the oracle's photo was made from 8-bit pixels, so the PNG round trip reproduces its input
    torch.testing.assert_close(feats["pre_logits"], oracle["features"][-1:], rtol=1e-4, atol=1e-4)


@pytest.fixture
def eager_compile(monkeypatch):
    """``torch.compile`` through dynamo's eager backend (tracing without code generation), recording the
    compile modes asked for and the batch shapes each compiled function is called with."""
    real = torch.compile
    calls = []

    def fake(fn, **kwargs):
        compiled = real(fn, backend="eager")
        shapes = []
        calls.append((kwargs, shapes))

        def run(x, *args, **kw):
            shapes.append(tuple(x.shape))
            return compiled(x, *args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake)
    return calls


def test_compile_pads_batches_to_one_graph(setup, tmp_path, eager_compile, capsys):
    """--compile: 4 good images and a corrupt one in batches of 3 give a full batch and a batch of 1, both run
    at 3 images (one compiled graph); the features are the eager model's."""
    root, ckpt, model, names = setup
    out = tmp_path / "f.safetensors"
    rc, err = _run(["vim_tiny", *KW, "--img-size", "32", "--num-classes", "10", "--checkpoint", str(ckpt),
                    "--input", str(root), "--out", str(out), "--batch-size", "3", "--layers", "1", "--pooled",
                    "--compile"], capsys)
    assert rc == 1 and "corrupt.png" in err and "--compile without a GPU" in err
    ((kwargs, shapes),) = eager_compile
    assert kwargs == dict(mode="reduce-overhead")
    assert [s[0] for s in shapes] == [3, 3]
    feats, got_names = inf.load_features(str(out))
    assert got_names == names
    x = _reference_input(model, root, names)
    with torch.no_grad():
        final, (maps,) = model.forward_intermediates(x, indices=[1], output_fmt="NCHW")
        pooled = model.forward_head(final, pre_logits=True)
    assert feats["pre_logits"].shape == (4, 64) and feats["layer1"].shape == (4, 64, 4, 4)
    torch.testing.assert_close(feats["pre_logits"], pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["layer1"], maps, rtol=1e-4, atol=1e-5)


def test_compile_errors(setup, tmp_path, capsys):
    root, ckpt, _, _ = setup
    out = tmp_path / "f.safetensors"
    rc, err = _run(["vim_tiny", *KW, "--input", str(root), "--out", str(out), "--compile", "fast"], capsys)
    assert rc == 2 and "--compile fast: expected one of reduce-overhead, default" in err
    rc, err = _run(["vim_tiny", *KW, "--input", str(root), "--out", str(out), "--keep-size", "--compile"], capsys)
    assert rc == 2 and "once per image size" in err
    assert not out.exists()


def test_compiled_batches_copies_and_cuts_outputs(eager_compile):
    """Outputs come back as copies cut to the batch (a CUDA-graph replay reuses its output memory), through
    dicts and tuples; batches outside 1..batch_size are refused."""
    def fn(x):
        return {"double": x * 2, "pair": (x.sum(1), 7)}

    run = inf.CompiledBatches(fn, batch_size=4, mode="default")
    x = torch.arange(6.0).view(2, 3)
    out = run(x)
    assert eager_compile[0][0] == {} and eager_compile[0][1] == [(4, 3)]
    torch.testing.assert_close(out["double"], x * 2)
    torch.testing.assert_close(out["pair"][0], x.sum(1))
    assert out["pair"][1] == 7 and out["double"]._base is None
    with pytest.raises(ValueError, match="a batch of 5 images; CompiledBatches takes 1 to 4"):
        run(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="--compile nope"):
        inf.CompiledBatches(fn, batch_size=4, mode="nope")


@pytest.mark.parametrize("keep_size", [False, True])
def test_uint8_transform_then_normalize_equals_the_float_transform(setup, keep_size):
    """The tools' loaders hand over uint8 images (a quarter of the bytes, no float work in the workers) and
    ``inf.normalize`` finishes them on the device: the same values as timm's float eval transform."""
    root, _, model, names = setup
    cfg = inf.data_config(model)
    for name in names:
        img = Image.open(root / name).convert("RGB")
        expected = inf.eval_transform(cfg, keep_size=keep_size)(img)
        raw = inf.eval_transform(cfg, keep_size=keep_size, normalize=False)(img)
        assert raw.dtype == torch.uint8 and raw.shape == expected.shape
        torch.testing.assert_close(inf.normalize(raw[None], cfg)[0], expected, rtol=0, atol=2e-6)
