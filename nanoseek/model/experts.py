"""Routed experts as one autograd function: sort-based dispatch with a hand-written backward (training speed).

Computes, for N tokens x (N, D) routed to K experts each (indices (N, K), routing weights (N, K)),

    y[t] = sum_k w[t, k] * E_{i[t, k]}(x[t]),   E_e(v) = W2_e (silu(W1_e v) * (W3_e v))   (V3 sec. 2.1.2)

exactly the sum `MoE.routed` computes with autograd, but with the memory traffic of a CPU step cut down:
(token, expert) pairs are sorted by expert; each expert gathers its rows of x (`index_select`), runs its three
GEMMs, scales its (n_e, inter_dim) hidden activation by the routing weights (not the (n_e, D) output: half the
bytes when inter_dim = D / 2) and scatters straight into y (`index_add_`). The autograd version instead builds
an (N K, D) gathered copy, a concatenation of the expert outputs, a weighted copy of it, and in backward the
same three again plus ~20 autograd nodes per expert; elementwise passes over (N K, D) tensors are what a CPU
step is short of (memory bandwidth), not FLOPs.

Saved for backward: the gate and up projections g, u (N K x inter_dim each) in sorted order, nothing of size
(N K, D): backward re-gathers the rows of x and of dy. Backward per expert, with a = silu(g), h = a * u,
hw = w * h (w the pair's routing weight), s = sigmoid(g):

    dW2 = dy^T hw          dhw = dy W2          dw = sum_j dhw * h        dh = w * dhw
    du = dh * a            dg = dh * u * s * (1 + g (1 - s))              (silu'(g))
    dW1 = dg^T x           dW3 = du^T x         dx += dg W1 + du W3

An expert that receives no token is not an input of the function at all (`routed_experts` passes only the
busy experts' weights), so it is not in the autograd graph, as with the autograd loop, and its gradient stays
None (the trainers fill zeros). Were its weights inputs with a None gradient, plain backward would be fine but
torch.distributed.pipelining's split weight backward (ZB-V, DualPipeV), which asks autograd for the gradient of
every parameter it finds in the graph, fails ("appears to not have been used in the graph").

Used for FP32 training and FP32 no-grad forwards; FP8 experts (per-weight quantization) and autocast (BF16)
keep the autograd loop. Tested against that loop (outputs and every gradient) and by `torch.autograd.gradcheck`
in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: list[int],
                *params: torch.Tensor) -> torch.Tensor:
        """x (N, D); weights, indices (N, K); counts: tokens per expert in expert order (python ints, sum N K),
        zero counts allowed; params: w1_0, w3_0, w2_0, w1_1, ... (the nn.Linear weights, (I, D), (I, D), (D, I),
        of the experts in `counts`, in the same order)."""
        K = indices.size(1)
        order = indices.flatten().argsort(stable=True)
        token_of = order // K
        w_sorted = weights.flatten()[order]
        y = torch.zeros_like(x)
        gs, us = [], []
        pos = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w1, w3, w2 = params[3 * e:3 * e + 3]
            rows = token_of[pos:pos + n]
            xe = x.index_select(0, rows)
            g, u = F.linear(xe, w1), F.linear(xe, w3)
            hw = F.silu(g).mul_(u).mul_(w_sorted[pos:pos + n, None])
            y.index_add_(0, rows, F.linear(hw, w2))
            gs.append(g)
            us.append(u)
            pos += n
        ctx.save_for_backward(x, w_sorted, token_of, order, *gs, *us, *params)
        ctx.counts, ctx.weights_shape = counts, weights.shape
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w_sorted, token_of, order, *rest = ctx.saved_tensors
        counts = ctx.counts
        used = sum(1 for n in counts if n)
        gs, us, params = rest[:used], rest[used:2 * used], rest[2 * used:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if need_x else None
        gw_sorted = torch.empty_like(w_sorted) if need_w else None
        gparams: list[torch.Tensor | None] = [None] * len(params)
        gy = gy.contiguous()
        pos = j = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w1, w3, w2 = params[3 * e:3 * e + 3]
            g, u, rows, w = gs[j], us[j], token_of[pos:pos + n], w_sorted[pos:pos + n, None]
            xe, gye = x.index_select(0, rows), gy.index_select(0, rows)
            s = torch.sigmoid(g)
            a = g * s  # silu(g)
            h = a * u
            ghw = gye.mm(w2)  # (n, I)
            if ctx.needs_input_grad[4 + 3 * e + 2]:
                gparams[3 * e + 2] = gye.t().mm(h * w)
            if need_w:
                gw_sorted[pos:pos + n] = (ghw * h).sum(dim=1)
            gh = ghw.mul_(w)
            gu = gh * a
            gg = gh.mul_(u).mul_(s.mul_(g.sub(g * s).add_(1)))  # dh * u * silu'(g)
            if ctx.needs_input_grad[4 + 3 * e]:
                gparams[3 * e] = gg.t().mm(xe)
            if ctx.needs_input_grad[4 + 3 * e + 1]:
                gparams[3 * e + 1] = gu.t().mm(xe)
            if need_x:
                gx.index_add_(0, rows, gg.mm(w1).addmm_(gu, w3))
            pos += n
            j += 1
        gweights = None
        if need_w:
            gweights = torch.empty_like(gw_sorted).scatter_(0, order, gw_sorted).view(ctx.weights_shape)
        return (gx, gweights, None, None, *gparams)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: list[int],
                   experts) -> torch.Tensor:
    """sum_k weights[:, k] * experts[indices[:, k]](x) for SwiGLU experts with .w1/.w3/.w2 Linears."""
    busy = [e for e, n in enumerate(counts) if n]  # idle experts stay out of the graph (see the docstring)
    params = [p for e in busy for p in (experts[e].w1.weight, experts[e].w3.weight, experts[e].w2.weight)]
    return RoutedExperts.apply(x, weights, indices, [counts[e] for e in busy], *params)
