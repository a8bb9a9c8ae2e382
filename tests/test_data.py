"""Packing and the resumable loader: exact rows, every transition once, deterministic order, exact restore,
and rank slices that add up to the one-process global batch."""
import itertools

import numpy as np
import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.data import Loader, eval_batches, pack_aligned, pack_documents, split_rows

EOS = 1


def test_pack_rows_exact():
    docs = [[5, 6, 7], [8, 9, EOS], [10]]  # the second already ends with eos: no doubled separator
    rows = pack_documents(docs, seq_len=3, eos_id=EOS)
    # stream: 5 6 7 1 8 9 1 10 1  (9 tokens) -> (9 - 1) // 3 = 2 rows of 4, stride 3
    assert rows.tolist() == [[5, 6, 7, EOS], [EOS, 8, 9, EOS]]
    x, y = split_rows(rows)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_pack_trains_every_transition_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 50, size=rng.integers(1, 20)).tolist() for _ in range(50)]
    stream = [t for d in docs for t in d + [EOS]]
    seq_len = 7
    x, y = split_rows(pack_documents(docs, seq_len, EOS))
    pairs = list(zip(x.flatten().tolist(), y.flatten().tolist()))
    expected = list(itertools.pairwise(stream))[:len(pairs)]
    assert pairs == expected  # consecutive, no gap, no repeat
    assert len(stream) - 1 - len(pairs) < seq_len  # only the short tail is dropped


def test_pack_empty_and_bad_seq_len():
    assert pack_documents([], 8, EOS).shape == (0, 9)
    with pytest.raises(ConfigError):
        pack_documents([[1, 2]], 0, EOS)


def _split_into_docs(row: list[int]) -> list[list[int]]:
    """A row cut after every eos: whole documents, then possibly one head without its eos."""
    parts, cur = [], []
    for t in row:
        cur.append(t)
        if t == EOS:
            parts.append(cur)
            cur = []
    return parts + ([cur] if cur else [])


def test_pack_aligned_rows_are_whole_documents_then_one_head():
    rng = np.random.default_rng(1)
    docs = [[100 + i] + rng.integers(2, 50, size=rng.integers(0, 12)).tolist() for i in range(300)]  # unique first token
    by_first = {d[0]: d + [EOS] for d in docs}
    rows = pack_aligned(docs, seq_len=15, eos_id=EOS, window=8)
    assert rows.shape[1] == 16 and rows.size(0) > 0
    seen = []
    for row in rows.tolist():
        parts = _split_into_docs(row)
        assert parts[0][0] >= 100  # the row starts at a document start
        for k, part in enumerate(parts):
            full = by_first[part[0]]
            if k < len(parts) - 1 or part[-1] == EOS:
                assert part == full  # a whole document
            else:
                assert part == full[:len(part)] and len(part) < len(full)  # the last one may be a cropped head
            seen.append(part[0])
    assert len(seen) == len(set(seen))  # no document twice
    assert len(seen) >= 300 - 8  # everything but (at most) the last window's leftovers is used


def test_pack_aligned_prefers_the_longest_fitting_document():
    # row width 8: [9 9 9 9 9 EOS] (6) leaves 2 -> [7 EOS] fits exactly, ahead of the earlier, longer [3 3 EOS]
    docs = [[9, 9, 9, 9, 9], [3, 3], [7]]
    rows = pack_aligned(docs, seq_len=7, eos_id=EOS, window=3)
    assert rows.tolist()[0] == [9, 9, 9, 9, 9, EOS, 7, EOS]


def test_pack_aligned_bad_seq_len():
    assert pack_aligned([], 4, EOS).shape == (0, 5)
    with pytest.raises(ConfigError):
        pack_aligned([[1, 2]], 0, EOS)


def rows_fixture(n=37, seq_len=5):
    return torch.arange(n * (seq_len + 1)).view(n, seq_len + 1)


def test_loader_deterministic_epochs():
    rows = rows_fixture()
    a, b, c = Loader(rows, 8, seed=3), Loader(rows, 8, seed=3), Loader(rows, 8, seed=4)
    seq_a = [a.next_global_indices().tolist() for _ in range(10)]
    seq_b = [b.next_global_indices().tolist() for _ in range(10)]
    seq_c = [c.next_global_indices().tolist() for _ in range(10)]
    assert seq_a == seq_b and seq_a != seq_c
    # 37 rows, batch 8 -> 4 batches per epoch, each epoch draws distinct rows and a new permutation
    epoch0 = [i for batch in seq_a[:4] for i in batch]
    epoch1 = [i for batch in seq_a[4:8] for i in batch]
    assert len(set(epoch0)) == 32 and len(set(epoch1)) == 32 and epoch0 != epoch1
    assert a.state_dict() == {"epoch": 2, "index": 2, "seed": 3}


def test_loader_position_restores_exactly():
    rows = rows_fixture()
    ref = Loader(rows, 4, seed=7)
    expected = [ref.next_batch() for _ in range(25)]  # crosses several epochs (9 batches each)
    first = Loader(rows, 4, seed=7)
    for _ in range(11):
        first.next_batch()
    pos = first.state_dict()
    assert set(pos) == {"epoch", "index", "seed"}
    resumed = Loader(rows, 4, seed=0)  # the saved seed wins
    resumed.load_state_dict(dict(pos))
    for want in expected[11:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_make_the_global_batch(world):
    rows = rows_fixture(n=64)
    single = Loader(rows, 8, seed=1)
    ranks = [Loader(rows, 8, seed=1, rank=r, world=world) for r in range(world)]
    for _ in range(12):
        want_x, want_y = single.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        for r, (x, y) in enumerate(parts):
            assert x.shape[0] == 8 // world
            assert torch.equal(x, want_x[r::world]) and torch.equal(y, want_y[r::world])


def test_loader_errors():
    rows = rows_fixture(n=5)
    with pytest.raises(ConfigError, match="multiple"):
        Loader(rows, 3, world=2)
    with pytest.raises(ConfigError, match="only 5 training sequences"):
        Loader(rows, 8)
    ld = Loader(rows, 2)
    with pytest.raises(ConfigError):
        ld.load_state_dict({"epoch": 0})
    with pytest.raises(ConfigError, match="does not fit"):
        ld.load_state_dict({"epoch": 0, "index": 99, "seed": 0})


def test_eval_batches_fixed_and_sharded():
    rows = rows_fixture(n=10)
    full = list(eval_batches(rows, 4, max_batches=5))
    assert len(full) == 2 and torch.equal(full[0][0], rows[:4, :-1])
    shards = [list(eval_batches(rows, 4, 5, rank=r, world=2)) for r in range(2)]
    assert torch.equal(shards[1][1][0], rows[4:8][1::2, :-1])
    small = list(eval_batches(rows[:3], 8, 5, world=2))  # fewer rows than a batch: 2 rows, evenly split
    assert len(small) == 1 and small[0][0].shape[0] == 1


def test_pack_aligned_fresh_crop_has_no_length_bias():
    """`crop="shortest"` (nanochat's) cuts the tail off the shortest pending document, so short documents lose
    their endings far more often than long ones; `crop="fresh"` cuts the next document of the (shuffled) stream,
    so the share of complete documents is about the same for short and long ones. Rows stay whole documents and
    one head either way."""
    rng = np.random.default_rng(3)
    docs = [[100 + i] + [5] * (int(rng.choice([6, 40])) - 1) for i in range(3000)]  # two lengths, unique first tokens
    by_first = {d[0]: len(d) + 1 for d in docs}

    def complete_share(rows, length):
        done = [p[0] for row in rows.tolist() for p in _split_into_docs(row) if len(p) == by_first[p[0]]]
        total = sum(1 for d in docs if len(d) == length)
        return sum(1 for f in done if by_first[f] == length + 1) / total

    old = pack_aligned(docs, seq_len=127, eos_id=EOS)
    new = pack_aligned(docs, seq_len=127, eos_id=EOS, crop="fresh")
    assert complete_share(old, 6) < complete_share(old, 40) - 0.05  # the bias being fixed
    assert abs(complete_share(new, 6) - complete_share(new, 40)) < 0.05
    for row in new.tolist():
        assert row[0] >= 100
        parts = _split_into_docs(row)
        assert all(len(p) == by_first[p[0]] for p in parts[:-1])
