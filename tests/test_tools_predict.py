"""tools/predict.py: top-k on the official oracle's real photo, text/JSON output, bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_loading import load_tool

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "tests" / "data" / "vim_tiny_depth4_official.pt"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


predict = load_tool("predict")


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory):
    """The oracle checkpoint as an official-style ``{'model': sd}`` file and its real photo as a PNG."""
    tmp = tmp_path_factory.mktemp("predict")
    oracle = torch.load(ORACLE, weights_only=False)
    ckpt = tmp / "vim_tiny_depth4.pth"
    torch.save({"model": oracle["state_dict"]}, ckpt)
    # un-normalise the last (real) image; with --img-size 224 --crop-pct 1.0 it passes through the
    # eval transform unchanged up to uint8 rounding
    img = (oracle["input"][-1] * STD + MEAN).clamp(0, 1)
    png = tmp / "photo.png"
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(png)
    return ckpt, png, oracle["logits"][-1]


def _args(ckpt, *extra):
    # images last, right after --model-kwargs: they must not be taken for model kwargs
    return ["vim_tiny", "--checkpoint", str(ckpt), "--img-size", "224", "--crop-pct", "1.0",
            "--device", "cpu", "--model-kwargs", "depth=4", *extra]


def test_predict_oracle_photo_json(oracle_files, tmp_path, capsys):
    ckpt, png, logits = oracle_files
    missing = tmp_path / "nope.jpg"
    rc = predict.main(["--topk", "3", "--json", *_args(ckpt, str(png), str(missing))])
    out, err = capsys.readouterr()
    assert rc == 1  # the missing file is reported, the photo still classified
    assert "nope.jpg" in err and "no such file" in err
    doc = json.loads(out)
    assert [e["file"] for e in doc["errors"]] == [str(missing)]
    (result,) = doc["results"]
    top = result["topk"]
    assert len(top) == 3
    expected = logits.softmax(-1)
    assert top[0]["index"] == int(logits.argmax())
    # the oracle's photo was made from 8-bit pixels: the PNG round trip reproduces its input exactly
    assert [t["prob"] for t in top] == pytest.approx(expected.topk(3).values.tolist(), rel=1e-4)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert top[0]["name"] == info.index_to_description(top[0]["index"])
    assert top[0]["label"] == info.index_to_label_name(top[0]["index"])
    assert [t["index"] for t in top] == logits.topk(3).indices.tolist()


def test_predict_text_lines_and_bad_image(oracle_files, tmp_path, capsys):
    ckpt, png, logits = oracle_files
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    rc = predict.main(["--topk", "2", *_args(ckpt, str(png), str(bad))])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{png}: ")
    from timm.data import ImageNetInfo

    assert ImageNetInfo().index_to_description(int(logits.argmax())) in lines[0]
    assert "broken.png" in err


def test_predict_checkpoint_mismatch(oracle_files, capsys):
    ckpt, png, _ = oracle_files
    rc = predict.main(["vim_tiny", "--model-kwargs", "depth=5", "--checkpoint", str(ckpt), str(png), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit" in err and "missing keys" in err and "blocks.4." in err


def test_predict_compile(oracle_files, tmp_path, capsys, monkeypatch):
    """--compile (torch.compile stubbed: the wiring, not Inductor): a bare ``--compile`` before an image leaves the
    image an image, the single image is padded to the batch size and its probabilities are the eager ones; a bad
    mode is refused."""
    ckpt, png, logits = oracle_files
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return lambda x: (seen.append(tuple(x.shape)), fn(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    rc = predict.main(["--topk", "3", "--json", "--batch-size", "2", *_args(ckpt, "--compile", str(png))])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert seen == [dict(mode="reduce-overhead"), (2, 3, 224, 224)]
    (result,) = json.loads(out)["results"]
    assert result["file"] == str(png)
    assert [t["prob"] for t in result["topk"]] == pytest.approx(logits.softmax(-1).topk(3).values.tolist(), rel=1e-4)
    rc = predict.main([*_args(ckpt, str(png)), "--compile", "fastest"])
    assert rc == 2 and "--compile fastest: expected one of" in capsys.readouterr().err
