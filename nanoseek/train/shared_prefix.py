"""Shared-prompt packing for the GRPO update: the G completions of a group run over ONE copy of their prompt.

A GRPO batch holds every prompt G times. Per-row training forwards recompute the prompt's hidden states G
times (and pad every row to the longest one). Here the rows that share a prompt become one packed sequence

    [ prompt (P tokens) ; c_1[:-1] ; c_2[:-1] ; ... ; c_m[:-1] ]        (then right padding to the micro-batch)

with each completion token at its own rope position (P + t) and an attention mask that lets it see the whole
prompt and the earlier tokens of its own completion only (a prefix tree of depth one, as in prefix-sharing /
"tree attention" trainers). Causal attention makes the prompt's hidden states independent of what follows
them, so every position computes exactly what the per-row forward computes there, and the gradient
flowing into the prompt is the sum of the G rows' (autograd through the shared tokens). A completion's
last token is not an input (it predicts nothing), and the prompt's last position, whose hidden state is
shared, predicts the first token of every completion. The LM head and the log-softmax run only on the
positions that predict a completion token (no prompt positions, no padding).

Expert loads (the MoE bias update): a packed prompt token stands for the m rows that share it, so it
counts with weight m (`Transformer.set_load_mask` with weights); every row thus counts its own input
tokens, the prompt and all completion tokens but the last, as a per-row forward would.

Simplifications: the mask is dense (N x N per pack), so attention computes scores for the other
completions' keys and masks them; at RL lengths (P ~ 11, completions ~ 17) that is cheaper than the
prompt recomputation it replaces (docs/grpo_bench.md counts both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """One micro-batch: R packed sequences of width N holding n completion rows (in the order of `rows`)."""

    ids: torch.Tensor  # (R, N) long, right-padded with 0
    positions: torch.Tensor  # (R, N) rope positions
    mask: torch.Tensor  # (R, 1, N, N) bool, True = attend
    load_weight: torch.Tensor  # (R, N) float: rows each input token stands for (0 = padding)
    src: torch.Tensor  # (M,) flat index into (R * N) of the position predicting each completion token
    row: torch.Tensor  # (M,) the completion row (0..n-1) of each predicted token
    col: torch.Tensor  # (M,) its index within that completion
    targets: torch.Tensor  # (M,) the predicted tokens
    rows: list[int]  # the caller's row index of each of the n completion rows
    width: int  # Lc: the longest completion of the micro-batch (columns of the per-row matrices)

    def to_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """(M,) per-token values -> (n, Lc) per-row matrix, zero where a row has no token (autograd kept)."""
        out = flat.new_zeros(len(self.rows), self.width)
        return out.index_put((self.row, self.col), flat)


def group_by_prompt(rows: list[int], prompts: list[list[int]]) -> list[list[int]]:
    """`rows` grouped by identical prompt, in first-appearance order (a GRPO group: its G rows)."""
    packs: dict[tuple[int, ...], list[int]] = {}
    for i in rows:
        packs.setdefault(tuple(prompts[i]), []).append(i)
    return list(packs.values())


def plan_micro_batches(rows: list[int], prompts: list[list[int]], completions: list[list[int]],
                       max_rows: int) -> list[list[list[int]]]:
    """Micro-batches (lists of packs, each a list of row indices) of at most `max_rows` completion rows.
    Packs are cut to `max_rows` rows, sorted by packed length (less right padding) and filled greedily."""
    packs = []
    for pack in group_by_prompt(rows, prompts):
        packs += [pack[s:s + max_rows] for s in range(0, len(pack), max_rows)]

    def length(pack: list[int]) -> int:
        return len(prompts[pack[0]]) + sum(max(len(completions[i]) - 1, 0) for i in pack)

    packs.sort(key=length)
    out: list[list[list[int]]] = []
    n = 0
    for pack in packs:
        if not out or n + len(pack) > max_rows:
            out.append([])
            n = 0
        out[-1].append(pack)
        n += len(pack)
    return out


def pack(packs: list[list[int]], prompts: list[list[int]], completions: list[list[int]], device) -> Packed:
    """Build the packed tensors of one micro-batch (see the module docstring)."""
    ids, pos, seg, weight = [], [], [], []
    src, src_pack, row, col, tgt, rows = [], [], [], [], [], []
    for k, pk in enumerate(packs):
        prompt = prompts[pk[0]]
        P = len(prompt)
        s_ids, s_pos, s_seg, s_w = list(prompt), list(range(P)), [-1] * P, [float(len(pk))] * P
        for j, i in enumerate(pk):
            c = completions[i]
            start = len(s_ids)  # pack offset of this completion's first input token
            r = len(rows)
            rows.append(i)
            src += ([P - 1] + list(range(start, start + len(c) - 1))) if c else []  # who predicts token t
            src_pack += [k] * len(c)
            row += [r] * len(c)
            col += range(len(c))
            tgt += c
            n_in = max(len(c) - 1, 0)
            s_ids += c[:n_in]
            s_pos += range(P, P + n_in)
            s_seg += [j] * n_in
            s_w += [1.0] * n_in
        ids.append(s_ids)
        pos.append(s_pos)
        seg.append(s_seg)
        weight.append(s_w)
    N = max(len(s) for s in ids)

    def padded(rows_, fill, dtype):
        return torch.tensor([r + [fill] * (N - len(r)) for r in rows_], dtype=dtype)

    ids_t, pos_t, seg_t = padded(ids, 0, torch.long), padded(pos, 0, torch.long), padded(seg, -2, torch.long)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    mask = causal[None] & ((seg_t[:, None, :] == -1) | (seg_t[:, None, :] == seg_t[:, :, None]))
    mask |= torch.eye(N, dtype=torch.bool)[None]  # padding queries see themselves (no empty softmax rows)
    flat_src = torch.tensor(src, dtype=torch.long) + N * torch.tensor(src_pack, dtype=torch.long)
    width = max((len(completions[i]) for i in rows), default=1)

    def dev(t):
        return t.to(device)

    return Packed(dev(ids_t), dev(pos_t), dev(mask[:, None]), dev(padded(weight, 0.0, torch.float32)), dev(flat_src),
                  dev(torch.tensor(row, dtype=torch.long)), dev(torch.tensor(col, dtype=torch.long)),
                  dev(torch.tensor(tgt, dtype=torch.long)), rows, max(width, 1))


def packed_hidden(model, p: Packed) -> torch.Tensor:
    """Final hidden states (before the last norm) of the positions that predict completion tokens: (M, dim).
    Expert loads count each input token with its `load_weight`."""
    model.set_load_mask(p.load_weight)
    try:
        h = model.hidden(p.ids, p.positions, p.mask)
    finally:
        model.set_load_mask(None)
    return h.flatten(0, 1).index_select(0, p.src)
