"""llama.cpp's `deepseek2` forward pass (src/models/deepseek2.cpp, absorbed-MLA branch, and build_moe_ffn) written
in numpy from a GGUF file alone: the independent reference tests/test_gguf.py holds the exporter to without
llama.cpp installed. It reads only the file (tensors by GGUF name, hyperparameters by GGUF key) and follows
ggml's conventions: a tensor of ggml shape [ne0, ne1, ne2] is the numpy array (ne2, ne1, ne0), and
ggml_mul_mat(W, x) with W (out, in) is x @ W.T. RoPE is ggml's NORM mode (adjacent pairs). No YaRN, no KV cache
(the whole sequence at once, causal), float64 throughout.
"""
from __future__ import annotations

import gguf
import numpy as np


class GGUFModel:
    def __init__(self, path: str):
        r = gguf.GGUFReader(path)
        self.kv = {k: f.contents() for k, f in r.fields.items()}
        self.t = {}
        for t in r.tensors:
            data = t.data
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = gguf.quants.dequantize(data, t.tensor_type)
            self.t[t.name] = np.asarray(data, dtype=np.float64)

    def hp(self, key: str, default=None):
        return self.kv.get(f"deepseek2.{key}", default)

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        eps = self.hp("attention.layer_norm_rms_epsilon")
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """ggml_rope_ext NORM mode on (T, ..., d): pairs (2i, 2i+1) rotated by pos * base^(-2i/d)."""
        d = x.shape[-1]
        theta = pos[:, None] * self.hp("rope.freq_base") ** (-np.arange(0, d, 2) / d)  # (T, d/2)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (d // 2,)
        cos, sin = np.cos(theta).reshape(shape), np.sin(theta).reshape(shape)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _attn(self, i: int, x: np.ndarray) -> np.ndarray:
        t, T = self.t, x.shape[0]
        H, r = self.hp("attention.head_count"), self.hp("attention.kv_lora_rank")
        rope = self.hp("rope.dimension_count")
        k_mla = self.hp("attention.key_length_mla")
        nope = k_mla - rope
        p = f"blk.{i}."
        if self.hp("attention.q_lora_rank", 0):
            q = self._norm(x @ t[p + "attn_q_a.weight"].T, t[p + "attn_q_a_norm.weight"]) @ t[p + "attn_q_b.weight"].T
        else:
            q = x @ t[p + "attn_q.weight"].T
        q = q.reshape(T, H, k_mla)
        kv = x @ t[p + "attn_kv_a_mqa.weight"].T
        pos = np.arange(T, dtype=np.float64)
        k_pe = self._rope(kv[:, r:], pos)  # (T, rope)
        c = self._norm(kv[:, :r], t[p + "attn_kv_a_norm.weight"])  # (T, r)
        q_pe = self._rope(q[..., nope:], pos)  # (T, H, rope)
        q_abs = np.einsum("thn,hrn->thr", q[..., :nope], t[p + "attn_k_b.weight"])  # wk_b (H, r, nope)
        scores = (np.einsum("thr,sr->hts", q_abs, c) + np.einsum("thd,sd->hts", q_pe, k_pe)) / np.sqrt(k_mla)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        prob = np.exp(scores - scores.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        o_lat = np.einsum("hts,sr->thr", prob, c)
        o = np.einsum("thr,hvr->thv", o_lat, t[p + "attn_v_b.weight"])  # wv_b (H, v, r)
        return o.reshape(T, -1) @ t[p + "attn_output.weight"].T

    @staticmethod
    def _swiglu(x, gate, up, down):
        g = x @ gate.T
        return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T

    def _moe(self, i: int, x: np.ndarray) -> np.ndarray:
        t, p = self.t, f"blk.{i}."
        E, K = self.hp("expert_count"), self.hp("expert_used_count")
        logits = x @ t[p + "ffn_gate_inp.weight"].T
        if self.hp("expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        sel = probs + t.get(p + "exp_probs_b.bias", 0.0)
        groups, used = self.hp("expert_group_count", 0), self.hp("expert_group_used_count", 0)
        if groups > 1:  # top `used` groups by the sum of their 2 best biased scores
            g = sel.reshape(len(x), groups, E // groups)
            score = np.sort(g, -1)[..., -2:].sum(-1)
            keep = np.argsort(-score, -1, kind="stable")[:, :used]
            mask = np.full((len(x), groups), -np.inf)
            np.put_along_axis(mask, keep, 0.0, 1)
            sel = (g + mask[..., None]).reshape(len(x), E)
        top = np.argsort(-sel, -1, kind="stable")[:, :K]
        w = np.take_along_axis(probs, top, -1)
        if self.hp("expert_weights_norm", False):
            w = w / np.maximum(w.sum(-1, keepdims=True), 6.103515625e-5)
        scale = self.hp("expert_weights_scale", 0.0)
        if scale not in (0.0, 1.0):
            w = w * scale
        out = np.zeros_like(x)
        for n in range(len(x)):
            for k in range(K):
                e = top[n, k]
                out[n] += w[n, k] * self._swiglu(x[n], t[p + "ffn_gate_exps.weight"][e], t[p + "ffn_up_exps.weight"][e],
                                                 t[p + "ffn_down_exps.weight"][e])
        return out + self._swiglu(x, t[p + "ffn_gate_shexp.weight"], t[p + "ffn_up_shexp.weight"],
                                  t[p + "ffn_down_shexp.weight"])

    def logits(self, ids: list[int]) -> np.ndarray:
        """(T, n_vocab) logits of the token sequence `ids`."""
        t = self.t
        x = t["token_embd.weight"][ids]
        for i in range(self.hp("block_count")):
            p = f"blk.{i}."
            x = x + self._attn(i, self._norm(x, t[p + "attn_norm.weight"]))
            h = self._norm(x, t[p + "ffn_norm.weight"])
            if i < self.hp("leading_dense_block_count"):
                x = x + self._swiglu(h, t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"], t[p + "ffn_down.weight"])
            else:
                x = x + self._moe(i, h)
        return self._norm(x, t["output_norm.weight"]) @ t["output.weight"].T
