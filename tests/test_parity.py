"""Parity with the official hustvl/Vim model: outputs and gradients of official runs (tests/data)."""
import argparse
from pathlib import Path

import pytest
import timm
import torch

import vim

DATA = Path(__file__).parent / "data"
ORACLES = {
    "vim_tiny_depth4_official.pt": "vim_tiny",
    "vim_tiny_stride8_depth2_official.pt": "vim_tiny_stride8",
}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def load_oracle(name):
    return torch.load(DATA / name, weights_only=False)


def save_official_format(oracle, path):
    """Write the state dict the way the official training script does (with an argparse Namespace)."""
    torch.save({"model": oracle["state_dict"], "epoch": 299,
                "args": argparse.Namespace(model=oracle["model_fn"], lr=1e-3)}, path)


@pytest.fixture(scope="module", params=sorted(ORACLES))
def oracle_model(request, tmp_path_factory):
    oracle = load_oracle(request.param)
    path = tmp_path_factory.mktemp("ckpt") / "official.pth"
    save_official_format(oracle, path)
    # the public loading path: timm's pretrained machinery with a local file
    model = timm.create_model(ORACLES[request.param], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **oracle["overrides"])
    return oracle, model


def test_logits_and_features_match_official(oracle_model):
    oracle, model = oracle_model
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(oracle["input"])
        features = model.forward_head(tokens, pre_logits=True)
        logits = model.head(features)
    assert rel_err(features, oracle["features"]) < 1e-4
    assert rel_err(logits, oracle["logits"]) < 1e-4
    assert logits[-1].argmax() == oracle["logits"][-1].argmax()


def test_gradients_match_official():
    oracle = load_oracle("vim_tiny_depth4_official.pt")
    model = timm.create_model("vim_tiny", drop_path_rate=0.0, **oracle["overrides"])
    model.load_state_dict(vim.checkpoint_filter_fn(oracle["state_dict"], model))
    model.train()
    model(oracle["input"]).float().pow(2).mean().backward()
    grads = dict((k, p.grad) for k, p in model.named_parameters())
    expected = vim.checkpoint_filter_fn(oracle["grads"], model)
    assert len(expected) == len(oracle["grads"]) > 20
    for key, g in expected.items():
        assert grads[key] is not None, key
        assert rel_err(grads[key], g) < 1e-3, key


def test_load_official_checkpoint_is_weights_only(tmp_path):
    oracle = load_oracle("vim_tiny_stride8_depth2_official.pt")
    path = tmp_path / "ckpt.pth"
    save_official_format(oracle, path)
    sd = vim.load_official_checkpoint(str(path))
    assert set(sd) == set(oracle["state_dict"])
    # anything beyond tensors and argparse.Namespace is refused rather than unpickled
    torch.save({"model": oracle["state_dict"], "args": Path("/tmp")}, tmp_path / "odd.pth")
    with pytest.raises(RuntimeError, match="weights_only"):
        vim.load_official_checkpoint(str(tmp_path / "odd.pth"))


def test_mismatched_checkpoint_lists_keys(tmp_path):
    oracle = load_oracle("vim_tiny_depth4_official.pt")
    path = tmp_path / "official.pth"
    save_official_format(oracle, path)
    model = timm.create_model("vim_tiny", depth=6)
    with pytest.raises(RuntimeError, match=r"missing keys: blocks\.4\."):
        vim.load_checkpoint(model, str(path))
    small = timm.create_model("vim_small", depth=4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        vim.load_checkpoint(small, str(path))


def test_stride16_weights_into_stride8_and_no_class_token(tmp_path):
    """The finetune / segmentation paths: pos-embed resampled, class-token row kept or dropped."""
    oracle = load_oracle("vim_tiny_depth4_official.pt")
    path = tmp_path / "official.pth"
    save_official_format(oracle, path)
    plus = timm.create_model("vim_tiny_stride8", depth=4, num_classes=10)
    vim.load_checkpoint(plus, str(path))
    assert plus.pos_embed.shape == (1, 27 * 27 + 1, 192)
    # the class token's position row survives the resampling, in the middle
    assert torch.equal(plus.pos_embed[0, 27 * 27 // 2], oracle["state_dict"]["pos_embed"][0, 196 // 2])
    seg = timm.create_model("vim_tiny", depth=4, class_token=False, global_pool="avg", num_classes=0,
                            img_size=512, dynamic_img_size=True)
    vim.load_checkpoint(seg, str(path))
    assert seg.cls_token is None and seg.pos_embed.shape == (1, 32 * 32, 192)
