"""Expert-parallelism load balancer (EPLB): redundant experts and their placement on GPUs (V3 report sec. 3.4,
"redundant experts"; the policy and interface of DeepSeek's open-sourced `eplb.py`, github.com/deepseek-ai/EPLB).

Given each MoE layer's estimated expert loads, choose `num_replicas` physical experts per layer (every logical
expert at least once, the heaviest ones several times, a replica taking an equal share of its expert's tokens)
and place them `num_replicas / num_gpus` per GPU so that the heaviest GPU is as light as the heuristics allow:

* hierarchical (num_groups % num_nodes == 0): pack whole expert groups onto nodes (balanced by group load, so
  group-limited routing keeps most traffic inside a node), replicate within each node, pack each node's
  replicas onto its GPUs;
* global (otherwise): the same with one group and one node: replicate globally, pack onto all GPUs.

Packing is the greedy "heaviest item to the lightest bin that still has room" (every bin ends with the same
number of items; with one item per bin, item i stays in bin i); replication gives one more replica, each time, to the expert with the largest per-replica
load. Ties go to the lowest index (equal weights are visited in torch.sort's order, and pack loads
are summed in float32, so ties break as in the reference). Written from the published description and
signature; `rebalance_experts` reproduces the published README example exactly (see its docstring, which
tests/test_parallel_eplb.py runs).
"""
from __future__ import annotations

import numpy as np
import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (L, n) -> (pack (L, n), rank_in_pack (L, n)): each row's n items into num_packs packs of exactly
    n / num_packs items, heaviest first into the lightest pack with room."""
    L, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:  # one item per pack: keep items in place (no reason to permute)
        return torch.arange(n).repeat(L, 1), torch.zeros(L, n, dtype=torch.int64)
    pack = torch.empty(L, n, dtype=torch.int64)
    rank = torch.empty(L, n, dtype=torch.int64)
    weight = weight.float()
    order = weight.sort(dim=-1, descending=True).indices  # torch's order of equal weights, as the reference
    for layer in range(L):
        row = weight[layer].numpy()
        loads, fill = np.zeros(num_packs, dtype=np.float32), [0] * num_packs  # float32 sums, as the reference
        for item in order[layer].tolist():
            p = min((q for q in range(num_packs) if fill[q] < per_pack), key=loads.__getitem__)
            pack[layer, item], rank[layer, item] = p, fill[p]
            loads[p] += row[item]
            fill[p] += 1
    return pack, rank


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (L, n_log) -> (phy2log (L, num_phy), replica rank (L, num_phy), count (L, n_log)). Physical
    expert i < n_log is logical expert i; each extra one replicates the expert of largest load / count."""
    L, n_log = weight.shape
    if num_phy < n_log:
        raise ValueError(f"{num_phy} physical experts cannot hold {n_log} logical ones")
    phy2log = torch.arange(num_phy).repeat(L, 1)
    rank = torch.zeros(L, num_phy, dtype=torch.int64)
    count = torch.ones(L, n_log, dtype=torch.int64)
    rows = torch.arange(L)
    for i in range(n_log, num_phy):
        best = (weight / count).max(dim=-1).indices  # first maximum on ties
        phy2log[:, i], rank[:, i] = best, count[rows, best]
        count[rows, best] += 1
    return phy2log, rank, count


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L, n_log = weight.shape
    if n_log % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_phy % num_gpus:
        raise ValueError(f"need experts ({n_log}) % groups ({num_groups}) == groups % nodes ({num_nodes}) == "
                         f"gpus ({num_gpus}) % nodes == replicas ({num_phy}) % gpus == 0")
    group_size, groups_per_node = n_log // num_groups, num_groups // num_nodes
    log_per_node, phy_per_node, phy_per_gpu = n_log // num_nodes, num_phy // num_nodes, num_phy // num_gpus

    # 1. groups onto nodes; "node order" numbers experts node by node, group by group inside a node
    node, slot = balanced_packing(weight.view(L, num_groups, group_size).sum(-1), num_nodes)
    first = (node * groups_per_node + slot) * group_size  # (L, groups): node-order index of each group's first
    log2ord = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(1)  # (L, n_log)
    ord2log = torch.empty_like(log2ord).scatter_(1, log2ord, torch.arange(n_log).expand(L, -1))

    # 2. replicas within each node: rows are (layer, node) pairs
    w_ord = weight.gather(1, ord2log).view(L * num_nodes, log_per_node)
    phy2ord, phy_rank, ord_count = replicate_experts(w_ord, phy_per_node)

    # 3. each node's replicas onto its GPUs; a replica weighs its expert's load / replica count
    per_replica = (w_ord / ord_count).gather(1, phy2ord)
    gpu, gpu_slot = balanced_packing(per_replica, num_gpus // num_nodes)
    placed = gpu * phy_per_gpu + gpu_slot  # position of each replica inside its node
    place2phy = torch.empty_like(placed).scatter_(1, placed, torch.arange(phy_per_node).expand(L * num_nodes, -1))

    node_offset = (torch.arange(num_nodes) * log_per_node).repeat(L).unsqueeze(-1)
    place2ord = (phy2ord.gather(1, place2phy) + node_offset).view(L, num_phy)
    phy2log = ord2log.gather(1, place2ord)
    rank = phy_rank.gather(1, place2phy).view(L, num_phy)
    count = ord_count.view(L, n_log).gather(1, log2ord)
    return phy2log, rank, count


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan redundant experts and their placement.

    weight: (layers, num_logical_experts) estimated loads; num_replicas: physical experts per layer (a multiple
    of num_gpus); num_groups: expert groups of group-limited routing; num_nodes: nodes (fast intra-node links);
    num_gpus: GPUs in all (a multiple of num_nodes). Physical expert p lives on GPU p // (num_replicas / num_gpus).

    Returns phy2log (layers, num_replicas): the logical expert of each physical one; log2phy (layers,
    num_logical_experts, max_count): the physical indices of each logical expert's replicas, -1 padded;
    logcnt (layers, num_logical_experts): replicas per logical expert.

    DeepSeek's README example (2 layers, 12 experts, 16 replicas on 2 nodes x 4 GPUs, 4 groups):

    >>> weight = torch.tensor([[ 90, 132,  40,  61, 104, 165,  39,   4,  73,  56, 183,  86],
    ...                        [ 20, 107, 104,  64,  19, 197, 187, 157, 172,  86,  16,  27]])
    >>> phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    >>> print(phy2log)
    tensor([[ 5,  6,  5,  7,  8,  4,  3,  4, 10,  9, 10,  2,  0,  1, 11,  1],
            [ 7, 10,  6,  8,  6, 11,  8,  9,  2,  4,  5,  1,  5,  0,  3,  1]])
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (layers, experts), got shape {tuple(weight.shape)}")
    L, n_log = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, rank, count = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, count = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_count = int(count.max())
    log2phy = torch.full((L, n_log * max_count), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * max_count + rank, torch.arange(num_replicas).expand(L, -1))
    return phy2log, log2phy.view(L, n_log, max_count), count


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """(layers, num_gpus) load of each GPU under a plan: each replica takes load / replica count of its expert."""
    L, num_phy = phy2log.shape
    count = torch.zeros_like(weight, dtype=torch.float).scatter_add_(1, phy2log, torch.ones(L, num_phy))
    per_replica = (weight.float() / count).gather(1, phy2log)
    return per_replica.view(L, num_gpus, num_phy // num_gpus).sum(-1)


def identity_plan(num_experts: int, layers: int) -> torch.Tensor:
    """phy2log of plain expert parallelism (no redundancy): expert e is physical expert e."""
    return torch.arange(num_experts).repeat(layers, 1)
