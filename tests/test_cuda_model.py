"""The model's CUDA path (fused Triton mixer) against the float32 reference path. GPU only."""
from pathlib import Path

import pytest
import timm
import torch

import vim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DATA = Path(__file__).parent / "data"
ORACLES = {"vim_tiny_depth4_official.pt": "vim_tiny", "vim_tiny_stride8_depth2_official.pt": "vim_tiny_stride8"}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def oracle_models(name):
    oracle = torch.load(DATA / name, weights_only=False)
    models = {}
    for backend in ("reference", "triton"):
        m = timm.create_model(ORACLES[name], scan_backend=backend, **oracle["overrides"])
        m.load_state_dict(vim.checkpoint_filter_fn(oracle["state_dict"], m))
        models[backend] = m.cuda().eval()
    return oracle, models


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_cuda_fp32_and_bf16_match_official(name):
    oracle, models = oracle_models(name)
    x = oracle["input"].cuda()
    with torch.no_grad():
        fp32 = models["triton"](x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = models["triton"](x)
            bf16_ref = models["reference"](x)
    # fp32 Triton path vs the official float32 outputs
    assert rel_err(fp32, oracle["logits"]) < 1e-3
    # bf16 autocast: within bf16 tolerance of the official float32 logits, same top-1 on the real photo
    assert rel_err(bf16, oracle["logits"]) < 3e-2
    assert rel_err(bf16, bf16_ref) < 3e-2
    assert bf16[-1].argmax().item() == oracle["logits"][-1].argmax().item()


def test_cuda_gradients_match_reference():
    oracle, models = oracle_models("vim_tiny_depth4_official.pt")
    x = oracle["input"].cuda()
    grads = {}
    for backend, m in models.items():
        m.train()
        m.zero_grad()
        m(x).float().pow(2).mean().backward()
        grads[backend] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k, g in grads["reference"].items():
        # the Triton backward forms dA from differences of sums within each chunk, which costs float32
        # precision on A_log (1.1e-3 measured on an H100 before session 6 made the cross-chunk part one
        # product; docs/kernels.md); everything else is ~1e-6
        tol = 3e-3 if k.endswith(("A_log", "A_b_log")) else 1e-3
        assert rel_err(grads["triton"][k], g) < tol, k


def test_cuda_fused_add_norm_chain_equals_blocks_one_by_one():
    """The model adds each block's branch inside the next norm (one Triton kernel); under bf16 autocast its
    logits equal those of the blocks called one by one (separate norm and add) bit for bit, and its
    gradients within a few bf16 roundings (the scan's atomics sum dB / dC in no fixed order, and under autocast
    a float32 difference can flip the rounding of a bf16 gradient downstream: cls_token 3.1e-5 seen; on an H200 in
    session 36 the same model run twice differed by 1.17e-3 in block 0's x_proj weight gradient, one run of three)."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny", depth=4, num_classes=10).cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")

    def one_by_one(inp):
        h = model._embed(inp)
        for blk in model.blocks:
            h = blk(h)
        return model.forward_head(model.norm(h))

    results = []
    for fn in (model, one_by_one):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fn(x)
        logits.float().square().mean().backward()
        results.append((logits, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (chained, g_chained), (blocks, g_blocks) = results
    assert torch.equal(chained, blocks)
    for k, g in g_blocks.items():
        assert rel_err(g_chained[k], g) < 5e-3, k


def test_cuda_bf16_training_step_is_finite():
    model = timm.create_model("vim_tiny", depth=4, num_classes=10).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        x = torch.randn(8, 3, 224, 224, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_cuda_empty_batch():
    """No images through the Triton kernels (scan, conv, norms: no program runs) and back, under bf16 autocast."""
    model = timm.create_model("vim_tiny", depth=2, num_classes=10).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(torch.randn(0, 3, 224, 224, device="cuda"))
    assert y.shape == (0, 10)
    y.float().sum().backward()
    assert all(p.grad is None or not p.grad.abs().any() for p in model.parameters())


def test_torch_compile_has_no_graph_breaks_in_blocks():
    model = timm.create_model("vim_tiny", depth=2).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    explanation = torch._dynamo.explain(model.blocks[0])(torch.randn(2, 197, 192, device="cuda"))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x)
        out = compiled(x)
    assert rel_err(out, eager) < 3e-2


def test_cuda_graph_replay_matches_eager():
    """The kernels launch and allocate nothing that a CUDA graph cannot capture (tools/benchmark.py
    --cuda-graph relies on it): forward and backward replayed on new data equal the eager step."""
    model = timm.create_model("vim_tiny", depth=2, num_classes=10).cuda().train()
    static_x = torch.randn(4, 3, 224, 224, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = model(static_x)
        out.float().pow(2).mean().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = {n: p.grad.clone() for n, p in model.named_parameters()}
    out_replayed = static_out.clone()
    model.zero_grad(set_to_none=True)
    eager = step()
    assert rel_err(out_replayed, eager) < 1e-6
    # gradients summed with atomics (and cuDNN's patch-embedding weight gradient) differ in the last bits
    # between any two runs (2e-5 measured); a replay on stale or wrong buffers would be off by O(1)
    for n, p in model.named_parameters():
        assert rel_err(replayed[n], p.grad) < 1e-3, n


@pytest.mark.parametrize("autocast", [False, True])
def test_replayed_inference_is_the_models_bits(monkeypatch, autocast):
    """Inference mixer calls replayed from their recording (kernels/replay.py: integer addresses handed to the
    compiled kernels) give the model's logits bit for bit, on new data, and inside a CUDA graph capture."""
    from vim.kernels.bimamba import triton_bimamba as tb

    model = timm.create_model("vim_tiny", depth=3).cuda().eval()

    def run(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            return model(x)

    for _ in range(2):
        x = torch.randn(3, 3, 224, 224, device="cuda")
        with monkeypatch.context() as m:
            m.setattr(tb, "REPLAY", False)
            fresh = run(x)
        assert torch.equal(run(x), fresh)   # the first call of the signature records, later ones replay
        assert torch.equal(run(x), fresh)
    assert all(isinstance(r, vim.kernels.replay.Replay) for r in tb._REPLAYS.values()) and tb._REPLAYS
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, run(static_x))
