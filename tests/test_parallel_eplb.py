"""EPLB (nanoseek.parallel.eplb): DeepSeek's published README example exactly, plan invariants on random
cases, the replication step against brute force, and whole plans against the brute-force optimum."""
import doctest
import itertools
import random

import pytest
import torch

from nanoseek.parallel import eplb
from nanoseek.parallel.eplb import gpu_loads, rebalance_experts, replicate_experts

README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
# github.com/deepseek-ai/EPLB README, "Output:" of the example
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_readme_example_exactly():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    assert doctest.testmod(eplb).failed == 0  # the docstring prints the same tensor


def check_plan(w, phy2log, log2phy, logcnt, groups, nodes, gpus):
    L, E = w.shape
    R = phy2log.size(1)
    for layer in range(L):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=E), logcnt[layer])
        assert (logcnt[layer] >= 1).all()
        for e in range(E):  # log2phy lists exactly the replicas of e, -1 padded
            reps = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(reps) == logcnt[layer, e] and (phy2log[layer, reps] == e).all()
        if groups % nodes == 0:  # hierarchical: a node's replicas come from whole groups placed on that node
            node_of = torch.arange(R) // (R // nodes)
            group_of = phy2log[layer] // (E // groups)
            for g in range(groups):
                assert len(set(node_of[group_of == g].tolist())) == 1
            assert all(len(set(group_of[node_of == n].tolist())) == groups // nodes for n in range(nodes))


@pytest.mark.parametrize("seed", range(40))
def test_random_plans_are_valid_and_within_the_list_scheduling_bound(seed):
    rnd = random.Random(seed)
    nodes, gpus_per_node = rnd.choice([1, 2, 4]), rnd.choice([1, 2, 4])
    gpus, groups = nodes * gpus_per_node, rnd.choice([1, 2, 4, 8])
    E = groups * rnd.choice([1, 2, 3])
    R = gpus * max(rnd.choice([1, 2, 3]), -(-E // gpus)) + gpus * rnd.choice([0, 1])
    if groups % nodes == 0 and (R // nodes) < E // nodes:
        R = gpus * -(-E // gpus)
    w = torch.randint(0, 200, (2, E)).float() if seed % 2 else torch.rand(2, E) * 50
    phy2log, log2phy, logcnt = rebalance_experts(w, R, groups, nodes, gpus)
    check_plan(w, phy2log, log2phy, logcnt, groups, nodes, gpus)
    loads = gpu_loads(w, phy2log, gpus)
    assert torch.allclose(loads.sum(1), w.sum(1), rtol=1e-5)  # every token goes somewhere, once
    if groups % nodes:  # global policy: greedy list scheduling bound, mean GPU load + the largest replica
        bound = w.sum(1) / gpus + (w / logcnt).max(1).values
        assert (loads.max(1).values <= bound + 1e-4).all()


def test_replication_is_optimal_against_brute_force():
    """Giving each extra replica to the expert of largest load / count minimises the largest replica load."""
    rnd = random.Random(0)
    for _ in range(30):
        E, extra = rnd.randint(2, 5), rnd.randint(0, 4)
        w = torch.tensor([[float(rnd.randint(1, 60)) for _ in range(E)]])
        _, _, cnt = replicate_experts(w, E + extra)
        best = min(max(w[0, e].item() / (1 + c.count(e)) for e in range(E))
                   for c in itertools.combinations_with_replacement(range(E), extra))
        assert (w / cnt).max().item() == pytest.approx(best)


def brute_force_max_load(w: list[float], R: int, G: int) -> float:
    """Smallest achievable max GPU load over every replica count vector and every placement (G GPUs x R/G)."""
    E, per, best = len(w), R // G, float("inf")
    for extra in itertools.combinations_with_replacement(range(E), R - E):
        cnt = [1 + extra.count(e) for e in range(E)]
        items = sorted((w[e] / cnt[e] for e in range(E) for _ in range(cnt[e])), reverse=True)

        def place(i, loads, fill):
            nonlocal best
            if max(loads) >= best:
                return
            if i == len(items):
                best = max(loads)
                return
            for g in range(G):
                if fill[g] < per:
                    loads[g] += items[i]
                    fill[g] += 1
                    place(i + 1, loads, fill)
                    loads[g] -= items[i]
                    fill[g] -= 1
        place(0, [0.0] * G, [0] * G)
    return best


def test_whole_plans_against_the_brute_force_optimum():
    """No plan beats the optimum (checks gpu_loads and the constraints); the measured gap is reported."""
    rnd = random.Random(1)
    ratios = []
    for _ in range(25):
        G, E = rnd.choice([2, 3]), rnd.choice([3, 4, 5])
        R = G * rnd.choice([2, 3])
        if R < E:
            continue
        w = [float(rnd.randint(1, 100)) for _ in range(E)]
        phy2log, _, _ = rebalance_experts(torch.tensor([w]), R, 1, 1, G)
        got = gpu_loads(torch.tensor([w]), phy2log, G).max().item()
        opt = brute_force_max_load(w, R, G)
        assert got >= opt - 1e-6
        ratios.append(got / opt)
    assert min(ratios) == pytest.approx(1.0)  # often optimal


# ---- recorded loads and `nanoseek eplb` ----------------------------------------------------------------------
def fake_run(tmp_path, shares: list[list[list[float]]]):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model": {"n_expert_groups": 1}}))
    lines = [json.dumps({"step": i + 1, "loss": 1.0, "expert_load": s}) for i, s in enumerate(shares)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_recorded_loads_are_an_exponential_moving_average(tmp_path):
    from nanoseek.parallel.loads import recorded_loads

    a, b, c = [[0.5, 0.5]], [[1.0, 0.0]], [[0.0, 1.0]]
    fake_run(tmp_path, [a, b, c])
    got = recorded_loads(tmp_path, alpha=0.5)
    # ((a/2 + b/2) / 2 + c/2)
    assert torch.allclose(got, torch.tensor([[0.375, 0.625]]))


def test_eplb_command_table(tmp_path, capsys):
    from nanoseek import cli
    from nanoseek.commands.eplb import balance_table

    w = [[4.0, 1, 1, 1, 1, 1, 1, 1]]
    fake_run(tmp_path, [w])
    rows = balance_table(torch.tensor(w), 2, 1, 10, 1)
    assert rows[0]["contiguous"] == pytest.approx(7 / 5.5)  # GPU 0 holds 4+1+1+1, GPU 1 holds 1+1+1+1
    plan = rebalance_experts(torch.tensor(w), 10, 1, 1, 2)[0]
    per_gpu = gpu_loads(torch.tensor(w), plan, 2)[0]
    assert rows[0]["eplb"] == pytest.approx((per_gpu.max() / per_gpu.mean()).item())
    assert rows[0]["eplb"] < rows[0]["contiguous"]  # replicating expert 0 helps here
    assert cli.main(["eplb", "--run", str(tmp_path), "--gpus", "2", "--replicas", "10"]) == 0
    assert "EPLB 10 replicas" in capsys.readouterr().out
    assert cli.main(["eplb", "--run", str(tmp_path), "--gpus", "3", "--replicas", "10"]) == 2
    assert "multiple of --gpus" in capsys.readouterr().err
