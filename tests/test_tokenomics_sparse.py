"""The V3.2 row of `nanoseek cost` (nanoseek/tokenomics/sparse.py) against hand-computed DeepSeek-V3 / V3.2-Exp
numbers: MLA absorbed 2 x 128 x (2 x 512 + 64) = 278,528 FLOPs per (query, key), indexer 2 x 64 x 128 + 2 x 64 =
16,512 per key, cache 61 x (576 + 128) numbers; top-k >= context gives dense attention plus the indexer."""
from __future__ import annotations

import dataclasses
import json

import pytest

from nanoseek import cli
from nanoseek.config import ConfigError
from nanoseek.tokenomics import Scenario, load_model
from nanoseek.tokenomics.sparse import (
    SparseAttentionCost,
    dense_row,
    dsa_attention_flops,
    mean_selected,
    sparse_row,
)

V3 = load_model("v3-671b")
DSA = SparseAttentionCost(index_topk=2048, index_n_heads=64, index_head_dim=128, q_lora_rank=1536)
MQA, IDX, MHA = 278_528, 16_512, 2 * 128 * (192 + 128)


def test_flops_closed_forms():
    C = 131_072
    assert dsa_attention_flops(V3, DSA, "decode", C) == (IDX * C + MQA * 2048, IDX * C)
    assert dsa_attention_flops(V3, DSA, "decode", 1000) == (IDX * 1000 + MQA * 1000, IDX * 1000)
    mean_t = (C + 1) / 2
    sel = (2048 * 2049 / 2 + (C - 2048) * 2048) / C
    assert dsa_attention_flops(V3, DSA, "prefill", C)[0] == pytest.approx(IDX * mean_t + MQA * sel)
    # a short prompt: the masked MHA mode (dense work) is cheaper than the absorbed one over every key
    assert dsa_attention_flops(V3, DSA, "prefill", 1024)[0] == pytest.approx(IDX * 512.5 + MHA * 512.5)
    for k, c in ((4, 3), (4, 4), (4, 9), (7, 100)):
        assert mean_selected(k, c) == pytest.approx(sum(min(k, t) for t in range(1, c + 1)) / c)


def test_rows_at_long_context():
    sc = Scenario(context=131_072, batch=64)
    dense, sparse = dense_row(V3, sc), sparse_row(V3, sc, DSA)
    assert dense.cache_bytes_per_token == 61 * 576 * 2 and sparse.indexer_cache_bytes_per_token == 61 * 128 * 2
    assert sparse.cache_bytes_per_token == 61 * (576 + 128) * 2
    assert dense.attention_flops_per_token == 61 * MQA * 131_072
    assert sparse.attention_flops_per_token == 61 * (IDX * 131_072 + MQA * 2048)
    assert sparse.max_concurrent_sequences < dense.max_concurrent_sequences  # the bigger cache
    assert sparse.usd_per_mtok_output < dense.usd_per_mtok_output
    assert sparse.usd_per_mtok_input < dense.usd_per_mtok_input


def test_topk_at_least_the_context_is_dense_plus_indexer():
    sc = Scenario(context=4096, batch=8)
    wide = dataclasses.replace(DSA, index_topk=4096)
    dense, sparse = dense_row(V3, sc), sparse_row(V3, sc, wide)
    assert sparse.attention_flops_per_token - sparse.indexer_flops_per_token == dense.attention_flops_per_token
    assert sparse.decode_tokens_per_s < dense.decode_tokens_per_s  # more to read and compute, nothing skipped


def test_cli(capsys):
    assert cli.main(["cost", "--index-topk", "2048", "--context", "131072", "--batch", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["v3-671b", "v3-671b + DSA k=2048"]
    assert rows[1]["indexer_cache_bytes_per_token"] == 61 * 128 * 2
    assert cli.main(["cost", "--index-topk", "2048", "--attention", "mha"]) == 2
    assert "drop --attention" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=">= 1"):
        sparse_row(V3, sc := Scenario(), dataclasses.replace(DSA, index_n_heads=0))
    assert sc.context == 4096
