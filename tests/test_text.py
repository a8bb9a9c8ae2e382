"""User text (issue 26): corpus reading and its bad inputs, token shards (layout against an independent encoding,
disjoint held-out split, reuse, rebuild of what changed, SIGKILL mid-build), bits per byte against closed forms,
`pretrain --data` end to end with exact kill-and-resume, `eval --data`, `sample` on a text run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import cli
from nanoseek.config import ConfigError
from nanoseek.data import TokenRows, pack_documents
from nanoseek.text.bpb import bits_per_byte, bpb_sums, byte_unigram_entropy, token_byte_lengths
from nanoseek.text.prepare import train_text_tokenizer
from nanoseek.text.shards import BOUNDARY_ID, SplitSettings, build_shards, split_pieces, unit_hash
from nanoseek.text.sources import ReadStats, discover, read_documents
from nanoseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while the dog ran around the old house and the bird sang a song about rain "
         "under grey skies; numbers 12 and 345 appear too. ").split()


def prose(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    lines, line = [], []
    for w in rng.choice(WORDS, n_words):
        line.append(str(w))
        if len(line) >= 12:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)]) + "\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / f"doc{i}.txt").write_text(prose(i, 400 + 50 * i))
    (d / "sub" / "notes.md").write_text(prose(10, 3000))  # ~17 KB: split into pieces
    (d / "rows.jsonl").write_text("\n".join(json.dumps({"text": prose(20 + i, 60)}) for i in range(5)) + "\n")
    return d


@pytest.fixture
def tokenizer_file(tmp_path, corpus) -> Path:
    path = tmp_path / "tok" / "tokenizer.json"
    train_text_tokenizer([str(corpus)], 400).save(path)
    return path


# ---- reading and bad input ------------------------------------------------------------------------------------
def test_bad_inputs_are_skipped_and_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "good.txt").write_text("héllo wörld\n" * 3)
    (d / "image.bin").write_bytes(bytes(range(256)) * 4)  # NUL bytes: binary
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # invalid UTF-8
    (d / "empty.txt").write_bytes(b"")
    (d / "rows.jsonl").write_text('{"text": "one"}\nnot json at all\n{"other": "x"}\n[1, 2]\n{"text": "two"}\n')
    os.symlink(d / "loop", d / "loop")  # a symlink to itself
    (d / "sub").mkdir()
    os.symlink(d, d / "sub" / "up")  # a directory symlink loop: not followed
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["no text column here"]}), d / "wrong.parquet")
    pq.write_table(pa.table({"text": ["from parquet", None]}), d / "right.parquet")
    stats = ReadStats()
    docs = [doc for f in discover([str(d)]) for doc in read_documents(f, "text", stats)]
    assert sorted(docs) == sorted(["héllo wörld\n" * 3, "one", "two", "from parquet"])
    assert stats.skipped == {"binary files": 1, "files with invalid UTF-8": 1, "empty files": 1,
                             "lines that are not JSON": 1, "rows without a string 'text'": 1,
                             "rows that are not JSON objects": 1, "empty or non-text parquet values": 1,
                             "parquet files without a 'text' column (pass --text-field)": 1}


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "no files found"),
    (lambda p: os.symlink(p, p), "broken or looping symlink"),
])
def test_paths_that_name_nothing_are_one_line_errors(tmp_path, capsys, make, message):
    target = tmp_path / "data"
    make(target)
    code = cli.main(["pretrain", "--data", str(target), "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_corpus_of_only_unusable_files_is_one_error(tmp_path, tokenizer_file):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "a.bin").write_bytes(b"\0\1\2" * 100)
    (d / "b.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no documents.*1 binary files, 1 empty files"):
        build_shards([str(d)], tokenizer_file, tmp_path / "shards", 400, progress=None)


def test_split_pieces_keep_the_text_and_cut_a_line_with_no_newline():
    text = prose(3, 2000)
    pieces = split_pieces(text, 1000)
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])  # cut at line ends where one is near
    long_line = "x" * 5000
    assert [len(p) for p in split_pieces(long_line, 1000)] == [1000] * 5


# ---- shards -----------------------------------------------------------------------------------------------------
def independent_streams(paths, tok_file, settings):
    """The train / held-out streams rebuilt by hand from the files with the tokenizers library (the reference)."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(tok_file))
    train, val = [], []
    for f in discover(paths):
        for doc in read_documents(f, settings.text_field, ReadStats()):
            units = split_pieces(doc, settings.piece_chars) if f.suffix not in (".jsonl",) else [doc]
            pending: list[int] = []
            for u in units:
                ids = hf.encode(u, add_special_tokens=False).ids
                if unit_hash(u) < settings.val_share:
                    if pending:
                        train.extend(pending + [BOUNDARY_ID])
                        pending = []
                    val.extend(ids + [BOUNDARY_ID])
                else:
                    pending.extend(ids)
            if pending:
                train.extend(pending + [BOUNDARY_ID])
    return train, val


def test_shards_equal_an_independent_encoding_and_the_split_is_disjoint(tmp_path, corpus, tokenizer_file):
    settings = SplitSettings(val_share=0.2, piece_chars=1024)
    shards = build_shards([str(corpus)], tokenizer_file, tmp_path / "shards", 400, settings, progress=None)
    train_ref, val_ref = independent_streams([str(corpus)], tokenizer_file, settings)
    assert val_ref, "the fixture must hold some held-out units at this share"
    assert shards.stream("train").tolist() == train_ref
    assert shards.stream("val").tolist() == val_ref
    assert shards.stream("train").dtype == np.uint16
    m = shards.manifest
    assert m["split"]["train"]["tokens"] == len(train_ref) and m["split"]["val"]["tokens"] == len(val_ref)
    assert m["documents"] == 6 + 1 + 5
    # disjoint: no held-out unit's text occurs among the training units
    held = {u for f in discover([str(corpus)]) for d in read_documents(f, "text", ReadStats())
            for u in split_pieces(d, 1024) if unit_hash(u) < 0.2}
    trained = {u for f in discover([str(corpus)]) for d in read_documents(f, "text", ReadStats())
               for u in split_pieces(d, 1024) if unit_hash(u) >= 0.2}
    assert held and not held & trained


def test_shards_are_reused_and_only_changed_files_rebuilt(tmp_path, corpus, tokenizer_file):
    out = tmp_path / "shards"
    first = build_shards([str(corpus)], tokenizer_file, out, 400, progress=None)
    assert first.last_build["files"] == 8
    again = build_shards([str(corpus)], tokenizer_file, out, 400, progress=None)
    assert again.last_build is None  # nothing tokenized
    (corpus / "doc2.txt").write_text(prose(99, 500))
    changed = build_shards([str(corpus)], tokenizer_file, out, 400, progress=None)
    assert changed.last_build["files"] == 1
    fresh = build_shards([str(corpus)], tokenizer_file, tmp_path / "fresh", 400, progress=None)
    assert changed.stream("train").tolist() == fresh.stream("train").tolist()
    assert changed.stream("val").tolist() == fresh.stream("val").tolist()


def test_a_build_killed_mid_way_resumes_without_redoing_finished_files(tmp_path, corpus, tokenizer_file):
    out = tmp_path / "shards"
    code = subprocess.run(
        [sys.executable, "-c", "import sys; from nanoseek.text.shards import build_shards; "
         "build_shards([sys.argv[1]], sys.argv[2], sys.argv[3], 400, progress=None)",
         str(corpus), str(tokenizer_file), str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "NANOSEEK_TEST_KILL_AFTER_PARTS": "3"},
        capture_output=True).returncode
    assert code == -9
    assert not (out / "manifest.json").exists()
    assert len(list((out / "parts").glob("*.json"))) == 3
    resumed = build_shards([str(corpus)], tokenizer_file, out, 400, progress=None)
    assert resumed.last_build["files"] == 5  # the three finished parts were reused
    fresh = build_shards([str(corpus)], tokenizer_file, tmp_path / "fresh", 400, progress=None)
    assert resumed.stream("train").tolist() == fresh.stream("train").tolist()


def test_token_rows_on_disk_equal_packed_rows():
    docs = [list(range(3, 3 + n)) for n in (5, 9, 2, 17, 4)]
    stream = [t for d in docs for t in d + [1]]
    for L in (3, 4, 8):
        rows = TokenRows(np.asarray(stream, dtype=np.uint16), L)
        ref = pack_documents(docs, L, eos_id=1)
        assert rows.size(0) == ref.size(0)
        assert torch.equal(rows[torch.arange(rows.size(0))], ref)
        assert torch.equal(rows[1:3], ref[1:3])


# ---- bits per byte ----------------------------------------------------------------------------------------------
def test_token_bytes_sum_to_the_utf8_length(tokenizer_file):
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_file)
    text = "naïve café — 数学 🙂 the cat sat\n\tend 42"
    ids = tok.encode(text + "<|eos|>")
    assert int(token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))


def test_bpb_of_a_uniform_model_is_log2_vocab_times_tokens_per_byte():
    class Uniform(torch.nn.Module):
        def hidden(self, x):
            return x

        def logits(self, h):
            return torch.zeros(*h.shape, 7)

    token_bytes = torch.tensor([0, 0, 1, 2, 3, 1, 4])
    y = torch.tensor([[2, 3, 0, 6], [5, 5, 1, 4]])
    nats, nbytes, counted = bpb_sums(Uniform(), y, y, token_bytes).tolist()
    assert counted == 6 and nbytes == 1 + 2 + 4 + 1 + 1 + 3
    assert bits_per_byte(nats, nbytes) == pytest.approx(6 * math.log2(7) / 12)


def test_byte_unigram_entropy_closed_form():
    assert byte_unigram_entropy([b"abab", b"ab"]) == pytest.approx(1.0)
    assert byte_unigram_entropy([bytes(range(256))]) == pytest.approx(8.0)


# ---- end to end -------------------------------------------------------------------------------------------------
def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.pop("NANOSEEK_TEST_KILL_AFTER_STEP", None)
    return e


MICRO = {"dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 2, "n_dense_layers": 1, "n_heads": 2,
         "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64, "original_seq_len": 64}


def text_args(tmp_path: Path, corpus: Path, out: str, steps: int = 6) -> list[str]:
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    return ["pretrain", "--data", str(corpus), "--config", str(cfg), "--out", str(tmp_path / out), "--steps",
            str(steps), "--batch-size", "4", "--vocab-size", "300", "--val-share", "0.2", "--warmup", "2",
            "--eval-interval", "2", "--eval-batches", "2", "--ckpt-interval", "2", "--device", "cpu"]


def run_cli(args: list[str], extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], cwd=REPO, env={**env(), **(extra or {})},
                          capture_output=True, text=True, timeout=300)


def test_pretrain_on_text_kill_and_resume_is_exact_and_logs_bpb(tmp_path, corpus):
    full = run_cli(text_args(tmp_path, corpus, "full"))
    assert full.returncode == 0, full.stderr
    killed = run_cli(text_args(tmp_path, corpus, "killed"), {"NANOSEEK_TEST_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9
    resumed = run_cli(text_args(tmp_path, corpus, "killed") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "token shards up to date" in resumed.stdout
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    got = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(ref, got):
        for k in ("loss", "grad_norm", "eval_loss", "val_bpb"):
            assert a.get(k) == b.get(k), (a["step"], k)
    bpb = [r["val_bpb"] for r in ref if "val_bpb" in r]
    assert len(bpb) == 3 and bpb[-1] < bpb[0]  # learning shows in bits per byte
    # bpb is the held-out CE rescaled by tokens per byte: both from the same batches
    assert all(0 < r["val_bpb"] < 12 for r in ref if "val_bpb" in r)
    # eval --data prints one JSON object; sample continues raw text on a text run
    ev = run_cli(["eval", "--run", str(tmp_path / "full"), "--data", str(corpus / "doc0.txt"), "--json"])
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["bytes"] == len((corpus / "doc0.txt").read_bytes()) and res["tokens"] > 0
    assert res["bits_per_byte"] == pytest.approx(res["nats_per_token"] * res["tokens"] / math.log(2) / res["bytes"])
    sample = run_cli(["sample", "--run", str(tmp_path / "full"), "--prompt", "the cat", "--max-new-tokens", "5"])
    assert sample.returncode == 0 and sample.stdout.startswith("the cat")


def test_resume_with_a_changed_tokenizer_is_refused(tmp_path, corpus):
    assert run_cli(text_args(tmp_path, corpus, "run", steps=2)).returncode == 0
    tok = tmp_path / "run" / "tokenizer.json"
    other = train_text_tokenizer([str(corpus / "doc1.txt")], 300)
    other.save(tok)
    res = run_cli(text_args(tmp_path, corpus, "run", steps=4) + ["--resume"])
    assert res.returncode == 2 and "changed since" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_100_mb_file_with_no_newline_tokenizes_in_bounded_pieces(tmp_path, tokenizer_file):
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "one_line.txt", "w") as f:
        for _ in range(100):
            f.write(("word " * 200_000)[:1_000_000])
    shards = build_shards([str(big)], tokenizer_file, tmp_path / "shards", 400, progress=None)
    assert shards.manifest["bytes"] == 100_000_000
    assert shards.manifest["split"]["train"]["tokens"] + shards.manifest["split"]["val"]["tokens"] > 10_000_000


def test_two_process_ddp_on_text_matches_one_process(tmp_path, corpus):
    one = run_cli(text_args(tmp_path, corpus, "one", steps=3))
    assert one.returncode == 0, one.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "nanoseek.cli", *text_args(tmp_path, corpus, "ddp", steps=3)], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    got = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        for k in ("loss", "eval_loss", "val_bpb"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    assert (tmp_path / "ddp" / "shards" / "manifest.json").exists()  # rank 0 built them, rank 1 waited
