"""FP8 linear (V3 report sec. 3.3): each GEMM's quantization against a naive per-tile loop, the FP8 linear's
gradients against the gradients of the dequantized-inputs products, FP8 storage of the saved activation,
the _scaled_mm path against the emulation, and an fp8 model through the engine against its naive forward."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.engine import Engine
from nanoseek.engine.batcher import Batcher, Request
from nanoseek.model import Transformer
from nanoseek.model import fp8 as fp8mod
from nanoseek.model.fp8 import fp8_linear

FP8 = torch.float8_e4m3fn


def ref_dequant(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Naive per-tile quantize-dequantize: a Python loop over (rows x cols) tiles, scale = amax / 448."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i in range(0, x.size(0), rows):
        for j in range(0, x.size(1), cols):
            t = x[i:i + rows, j:j + cols].float()
            s = t.abs().max().clamp(min=1e-12) / 448
            out[i:i + rows, j:j + cols] = (t / s).to(FP8).float() * s
    return out


def operands(M=200, K=192, N=160, seed=0):
    """Partial edge tiles on every dim; per-channel outliers in x and per-token ones in the gradient, so that
    tiling along the wrong dimension gives visibly different quantization."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)[torch.randperm(K, generator=g)]
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g) * torch.logspace(-2, 2, M)[torch.randperm(M, generator=g)][:, None]
    return x, w, dy


def rel(a, b):
    return float((a - b).norm() / b.norm())


def run_linear(x, w, dy, per_tensor=False):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, per_tensor)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def test_fprop_dgrad_wgrad_match_per_tile_references():
    x, w, dy = operands()
    y, gx, gw = run_linear(x, w, dy)
    wq = ref_dequant(w, 128, 128)
    y_ref = ref_dequant(x, 1, 128) @ wq.t()  # fprop: x 1x128 along K
    gx_ref = ref_dequant(dy, 1, 128) @ wq  # dgrad: dy 1x128 along N, W 128x128
    xs = ref_dequant(x, 1, 128)  # the saved FP8 activation, requantized into 128x1 tiles for wgrad
    gw_ref = ref_dequant(dy, 128, 1).t() @ ref_dequant(xs, 128, 1)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert rel(got, ref) < 1e-5
    # the quantization is real, and the tile orientation matters: the wrong one is far off
    assert rel(y, x @ w.t()) > 1e-3 and rel(gw, dy.t() @ x) > 1e-3
    assert rel(gw, ref_dequant(dy, 1, 128).t() @ ref_dequant(x, 1, 128)) > 10 * rel(gw, gw_ref) + 1e-4
    assert rel(gx, ref_dequant(dy, 128, 1) @ wq) > 10 * rel(gx, gx_ref) + 1e-4


def test_gradient_equals_gradient_of_dequantized_inputs_product():
    """dx and dW of the FP8 linear = autograd's gradients of the product of the dequantized operands each
    backward GEMM sees (d(Xq Wq^T) with the output gradient quantized per GEMM)."""
    x, w, dy = operands(M=256, K=256, N=128, seed=1)
    _, gx, gw = run_linear(x, w, dy)
    # dgrad operands: dy (1x128) and W (128x128); wgrad operands: dy (128x1) and x (1x128 then 128x1)
    xd = ref_dequant(ref_dequant(x, 1, 128), 128, 1).requires_grad_()
    wd = ref_dequant(w, 128, 128).requires_grad_()
    F.linear(xd, wd).backward(ref_dequant(dy, 1, 128))
    gx_ref = xd.grad
    xd.grad = wd.grad = None
    F.linear(xd, wd).backward(ref_dequant(dy, 128, 1))
    assert rel(gx, gx_ref) < 1e-5 and rel(gw, wd.grad) < 1e-5


def test_scaled_mm_path_equals_emulation(monkeypatch):
    x, w, dy = operands()
    a = run_linear(x, w, dy)
    monkeypatch.setattr(fp8mod, "SCALED_MM", False)
    b = run_linear(x, w, dy)
    for u, v in zip(a, b):
        assert rel(u, v) < 1e-6


def test_per_128_chunk_fp32_accumulation():
    """scaled_matmul sums one FP32 product per 128-chunk of the contraction dim, each with its own scales."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 300, generator=g), torch.randn(300, 5, generator=g)
    aq, sa = fp8mod.quantize(a, 1, 128)
    bq, sb = fp8mod.quantize(b, 128, 1)
    ref = sum((aq[:, c:c + 128].double() * sa[:, i:i + 1].double()) @ (bq[c:c + 128].double() * sb[i:i + 1].double())
              for i, c in enumerate(range(0, 300, 128)))
    assert rel(fp8mod.scaled_matmul(aq, sa, bq, sb).double(), ref) < 1e-6


def test_saved_activation_is_fp8_storage():
    x, w, _ = operands(M=64, K=256, N=128)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear(x, w.requires_grad_())
    acts = [t for t in saved if t.shape == x.shape]
    assert len(acts) == 1 and acts[0].dtype == FP8 and acts[0].element_size() == 1
    assert all(t.dtype == FP8 or t.numel() < x.numel() or t is w for t in saved)


def test_per_tensor_scaling_is_worse_with_outliers():
    """One outlier token (x1000) and one small token / channel (x1e-3): with one scale per tensor the small
    ones underflow E4M3; per-tile scales keep them (the report's argument for fine-grained scaling)."""
    g = torch.Generator().manual_seed(4)
    x, w, dy = torch.randn(256, 256, generator=g), torch.randn(128, 256, generator=g) * 0.05, torch.randn(256, 128, generator=g)
    x[7] *= 1000
    x[3] *= 1e-3
    x[:, 200] *= 1e-3
    dy[9] *= 1000
    dy[3] *= 1e-3
    fine, coarse = run_linear(x, w, dy), run_linear(x, w, dy, per_tensor=True)
    exact = (x @ w.t(), dy @ w, dy.t() @ x)
    pick = (lambda t: t[3], lambda t: t[3], lambda t: t[:, 200])  # the small token (fprop, dgrad), channel (wgrad)
    for f, c, e, p in zip(fine, coarse, exact, pick):
        assert rel(p(f), p(e)) < 0.1 and rel(p(c), p(e)) > 3 * rel(p(f), p(e))
    run_linear(x[:1, :128], w[:, :128], dy[:1], per_tensor=True)  # one-tile operands (scale strides)


def test_bf16_autocast_output_and_gradient_dtypes():
    x, w, dy = operands(M=16, K=128, N=128)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


# ---- an fp8 model behaves the same at inference as in training --------------------------------------------
def fp8_model(fp8=True, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=128, inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=1,
                      n_heads=2, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, kv_lora_rank=128,
                      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_seq_len=64, original_seq_len=64,
                      fp8=fp8)
    m = Transformer(cfg)
    for p in m.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.1)
    return m.eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12]


def naive(model, prompt, n):
    """Greedy by full recompute, and the log-probs of the chosen tokens."""
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            seq.append(int(logp.argmax()))
            lps.append(float(logp.max()))
    return seq[len(prompt):], lps


def test_fp8_model_engine_and_batcher_equal_naive_forward():
    model = fp8_model()
    ref = [naive(model, p, 10) for p in PROMPTS]
    out = Engine(model, eos_id=-1).generate(PROMPTS, max_new_tokens=10)
    b = Batcher(model, eos_id=-1, max_slots=4)
    reqs = [b.submit(Request(p, max_new_tokens=10)) for p in PROMPTS]
    while b.rows or b.pending:
        b.step()
    for (toks, lps), o, r in zip(ref, out, reqs):
        assert o.tokens == toks and r.tokens == toks
        assert o.logprobs == pytest.approx(lps, abs=2e-4)
    # and FP8 really changes this model's outputs (so the equality above is not the fp32 path's)
    plain = fp8_model(fp8=False)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (model(ids) - plain(ids)).abs().max() > 1e-3
