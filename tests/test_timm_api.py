"""The checks of timm's own model test-suite (tests/test_models.py), applied to the vim_* models,
plus the timm API surface a backbone user relies on."""
import math

import pytest
import timm
import timm.optim
import torch
from timm.models import FeatureInfo
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import vim

VIM_MODELS = ["vim_tiny", "vim_small", "vim_base", "vim_tiny_stride8", "vim_small_stride8", "vim_base_stride8"]
# Small versions keep the CPU suite fast; the architecture (and every code path) is the same.
SMALL = dict(depth=4, embed_dim=64, img_size=64)


def small_model(name="vim_tiny", **kwargs):
    return timm.create_model(name, **{**SMALL, **kwargs})


def test_registered_with_pretrained_cfgs():
    assert set(VIM_MODELS) <= set(timm.list_models("vim_*"))
    assert {"vim_tiny.in1k", "vim_small.in1k", "vim_base.in1k", "vim_tiny_stride8.in1k",
            "vim_small_stride8.in1k"} <= set(timm.list_pretrained("vim_*"))
    for name in VIM_MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
        assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert timm.models.get_pretrained_cfg("vim_small.in1k").hf_hub_id == "hustvl/Vim-small-midclstok"


@pytest.mark.parametrize("name", VIM_MODELS)
def test_full_size_architecture(name):
    """The six registered sizes build with the official shapes (no forward: that is covered below)."""
    model = timm.create_model(name)
    dim = {"tiny": 192, "small": 384, "base": 768}[name.split("_")[1]]
    grid = 27 if "stride8" in name else 14
    assert model.num_features == model.head_hidden_size == dim and len(model.blocks) == 24
    assert model.pos_embed.shape == (1, grid * grid + 1, dim)
    mixer = model.blocks[0].mixer
    assert mixer.in_proj.weight.shape == (4 * dim, dim)
    assert mixer.x_proj_b.weight.shape == (math.ceil(dim / 16) + 32, 2 * dim)
    assert mixer.A_b_log.shape == (2 * dim, 16)


@pytest.mark.parametrize("name", ["vim_tiny", "vim_tiny_stride8"])
def test_model_forward(name):
    model = small_model(name).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vim_tiny", "vim_tiny_stride8"])
def test_model_backward(name):
    model = small_model(name, num_classes=42, drop_path_rate=0.1).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert out.shape[-1] == 42


def test_model_default_cfgs_non_std():
    model = small_model().eval()
    state_dict = model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 16 + 1, model.num_features)
    assert model.forward_head(tokens, pre_logits=True).shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    out = model(x)
    assert out.shape == (1, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == tokens.shape
    cfg = model.pretrained_cfg
    assert cfg["classifier"] + ".weight" in timm.create_model("vim_tiny", **SMALL).state_dict()
    assert cfg["first_conv"] + ".weight" in state_dict


def test_global_pool_options():
    model = small_model(global_pool="avg", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    patches = torch.cat([tokens[:, :8], tokens[:, 9:]], dim=1)  # class token sits at 16 // 2
    torch.testing.assert_close(model(x), patches.mean(1))
    model.reset_classifier(5, "token")
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 8])
    with pytest.raises(ValueError, match="class token"):
        small_model(class_token=False)


@pytest.mark.parametrize("name", ["vim_tiny", "vim_tiny_stride8"])
def test_model_forward_intermediates(name):
    model = small_model(name).eval()
    info = FeatureInfo(model.feature_info, range(len(model.feature_info)))
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    assert len(feats) == len(info.channels()) == 4
    for c, r, f in zip(info.channels(), info.reduction(), feats):
        assert f.shape[:2] == (2, c)
        assert f.shape[2] <= math.ceil(64 / r) + 1 and f.shape[3] <= math.ceil(64 / r) + 1
    torch.testing.assert_close(final, model.forward_features(x))
    # NLC tokens, prefix tokens, norm, and pruning leave the same numbers
    nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(nlc.transpose(1, 2).reshape(feats[1].shape), feats[1])
    (_, cls), = model.forward_intermediates(x, indices=[3], return_prefix_tokens=True, norm=True,
                                            intermediates_only=True)
    torch.testing.assert_close(cls[:, 0], final[:, (final.shape[1] - 1) // 2])
    taken = model.prune_intermediate_layers([0, 2], prune_norm=True)
    assert taken == [0, 2] and len(model.blocks) == 3
    pruned = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    torch.testing.assert_close(pruned[1], feats[2])


def test_replaced_stream_is_freed_before_the_mixer_runs(monkeypatch):
    """``_run_blocks`` keeps the residual stream and the pending branch only in the list each block empties
    (``VimBlock.forward_carry``): when block i's mixer runs, the stream and branch that its fused add replaced
    are gone (inference memory); block 0 adds nothing, and the first stream, which no caller's name holds, is
    the one block 1 replaces. The chained features equal the blocks run one by one."""
    import weakref

    torch.manual_seed(0)
    model = small_model(num_classes=5, depth=3, embed_dim=32, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    replaced, dead_at_mixer = {}, []
    for i, blk in enumerate(model.blocks):
        add = blk.norm.forward_add

        def recording_add(s, branch, i=i, add=add):
            replaced[i] = [weakref.ref(s)] + ([weakref.ref(branch)] if branch is not None else [])
            return add(s, branch)

        monkeypatch.setattr(blk.norm, "forward_add", recording_add)
        blk.mixer.register_forward_pre_hook(
            lambda mod, args, i=i: dead_at_mixer.append(all(r() is None for r in replaced[i])))
    with torch.no_grad():
        out = model.forward_features(x)
        h = model._embed(x)
        for blk in model.blocks:
            h = blk(h)
        ref = model.norm(h)
    assert dead_at_mixer[:3] == [False, True, True]
    assert torch.equal(out, ref)


def test_blocks_chain_their_adds_into_the_next_norm(monkeypatch):
    """The model adds each block's branch inside the next norm (``forward_pending``); features, intermediates
    and gradients equal those of the blocks run one by one, and equal again with the fused Triton add + norm
    (through the interpreter on the CPU)."""
    torch.manual_seed(0)
    model = small_model(num_classes=5, depth=3, embed_dim=32, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)

    def per_block():
        h = model._embed(x)
        feats = []
        for blk in model.blocks:
            h = blk(h)
            feats.append(h)
        return model.norm(h), feats

    def run(fn):
        model.zero_grad()
        final, feats = fn()
        (final.square().sum() + sum(f.sum() for f in feats)).backward()
        return [final, *feats], [p.grad.clone() for n, p in model.named_parameters() if not n.startswith("head")]

    def chained():
        final, feats = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, norm=False)
        # NLC without the class token, and the token apart: put it back in the middle
        feats = [vim.models.layers.insert_cls_token(f, c) for f, c in feats]
        return final, feats

    ref_out, ref_grads = run(per_block)
    out, grads = run(chained)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert torch.equal(a, b)
    torch.testing.assert_close(model.forward_features(x), ref_out[0], rtol=0, atol=0)

    from vim.kernels.selective_scan import triton_scan
    if not triton_scan._interpreted():
        return   # compiled kernels take CUDA tensors: test_cuda_fused_add_norm_chain_equals_blocks_one_by_one there
    import vim.kernels.norm.interface as norm_interface
    monkeypatch.setattr(norm_interface, "resolve_backend", lambda *args: "triton")
    out, grads = run(chained)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-4   # float32 sums in another order (1.2e-5 seen)


def test_model_forward_features_only():
    model = timm.create_model("vim_tiny", features_only=True, depth=8, embed_dim=64, img_size=64).eval()
    assert model.feature_info.channels() == [64] * 4
    assert model.feature_info.reduction() == [16] * 4
    outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 4, 4)] * 4
    full = timm.create_model("vim_tiny", features_only=True)
    assert [i["module"] for i in full.feature_info.get_dicts()] == [f"blocks.{i}" for i in (5, 11, 17, 23)]
    seg = timm.create_model("vim_tiny_stride8", features_only=True, out_indices=(1, 3), class_token=False,
                            global_pool="avg", dynamic_img_size=True, **SMALL)
    outs = seg(torch.randn(1, 3, 80, 48))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 9, 5)] * 2


def test_empty_batch():
    """A batch of no images goes through the classifier, its backward and the feature maps, as in timm's ViTs."""
    model = timm.create_model("vim_tiny", num_classes=10, **SMALL)
    x = torch.randn(0, 3, 64, 64)
    y = model(x)
    assert y.shape == (0, 10)
    y.sum().backward()
    feats = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(0, 64, 4, 4)] * 2


def test_model_forward_fx():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
        out = tuple(fx_model(x).values())[0]
    assert torch.equal(out, expected)


def test_dynamic_img_size_and_errors():
    model = small_model(dynamic_img_size=True).eval()
    out = model(torch.randn(1, 3, 96, 48))
    assert out.shape == (1, 1000)
    fixed = small_model().eval()
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="in_chans=1"):
        fixed(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"3-D tensor \(3, 64, 64\); add the batch dimension"):
        fixed(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="does not tile"):
        model(torch.randn(1, 3, 70, 64))
    padded = small_model(dynamic_img_size=True, dynamic_img_pad=True).eval()
    assert padded.forward_intermediates(torch.randn(1, 3, 70, 64), intermediates_only=True)[0].shape[-2:] == (5, 4)
    one_channel = small_model(in_chans=1).eval()
    assert one_channel(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_patchify_linear_equals_the_conv():
    """The CUDA stem (patch rows through one GEMM) is the stride == kernel conv: float64, non-square patches and
    images, gradients, and under autocast the same output dtype within its rounding."""
    from vim.models.layers import patchify_linear

    torch.manual_seed(0)
    for patch, size in (((16, 16), (64, 48)), ((4, 8), (12, 32))):
        conv = torch.nn.Conv2d(3, 24, kernel_size=patch, stride=patch).double()
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        ref = conv(x).permute(0, 2, 3, 1)
        out = patchify_linear(x, conv.weight, conv.bias)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
        for a, b in zip(grads, torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)):
            torch.testing.assert_close(a, b)
    conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = patchify_linear(x, conv.weight, conv.bias), conv(x).permute(0, 2, 3, 1)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_set_input_size_resamples_pos_embed():
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    model.set_input_size(96)
    assert model.pos_embed.shape == (1, 36 + 1, 64)
    assert model(torch.randn(1, 3, 96, 96)).shape == before.shape


def test_grad_checkpointing_same_result():
    model = small_model(num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    g_ref = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.patch_embed.proj.weight.grad, g_ref)


def test_no_weight_decay_and_param_groups():
    model = small_model()
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.mixer.A_log", "blocks.3.mixer.D_b"} <= nwd
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(model.named_parameters())
    for name in ("pos_embed", "cls_token", "blocks.1.mixer.A_b_log", "blocks.1.mixer.D", "norm.weight",
                 "blocks.1.mixer.conv1d.bias"):
        assert id(params[name]) in no_decay, name
    assert id(params["blocks.1.mixer.in_proj.weight"]) not in no_decay
    layer_groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.9).param_groups
    scales = sorted({g["lr_scale"] for g in layer_groups})
    assert len(scales) == len(model.blocks) + 2  # stem, each block, final norm/head


def test_half_precision_model_runs():
    model = small_model().eval().to(torch.bfloat16)
    out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_pretrained_in_chans_and_num_classes(tmp_path):
    """timm's load path adapts the first conv to in_chans and drops a classifier of another size."""
    src = small_model()
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    model = small_model(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1, num_classes=5)
    torch.testing.assert_close(model.blocks[2].mixer.A_log, src.blocks[2].mixer.A_log)
    assert model.patch_embed.proj.weight.shape[1] == 1 and model.head.out_features == 5
