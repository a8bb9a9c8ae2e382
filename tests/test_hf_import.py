"""`nanoseek import` and imported tokenizers (nanoseek.hf_import, nanoseek.hf_tokenizer), against transformers on
checkpoints the tests build themselves (tests/hf_fixture.py: random DeepseekV3ForCausalLM + a BPE tokenizer with
DeepSeek specials, an R1-style chat template, generation_config.json with two eos ids):

* chat prompts rendered by nanoseek == `AutoTokenizer.apply_chat_template(..., add_generation_prompt=True)`, token
  for token and character for character (system + multi-turn + think block, with and without generation prompt);
* greedy generation through `nanoseek generate`'s engine == transformers `generate(do_sample=False)`, 32 tokens;
* padded embedding rows are never sampled (== transformers with `suppress_tokens` on those rows);
* every eos id of generation_config.json stops the engine, the batcher, `sample` and the stream;
* the server's chat completion of a multi-turn conversation uses exactly the template's tokens and continues as
  transformers does;
* bad input: one ConfigError line before any work, and no run directory (nor temp directory) left behind;
* the template sandbox: Python internals, loops, runaway output, raise_exception -> one-line TemplateError.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import require_module
from safetensors.torch import load_file, save_file

transformers = require_module("transformers")
from hf_fixture import EOT, MESSAGES, build_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanoseek.cli import main  # noqa: E402
from nanoseek.commands.generate import load_engine  # noqa: E402
from nanoseek.config import ConfigError  # noqa: E402
from nanoseek.engine import decode  # noqa: E402
from nanoseek.engine.protocol import ChoiceStream, Message, chat_prompt_ids  # noqa: E402
from nanoseek.hf_import import import_checkpoint, write_safetensors  # noqa: E402
from nanoseek.hf_tokenizer import ChatTemplate, ImportedTokenizer, TemplateError, load_tokenizer  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt")


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "imported"
    assert main(["import", "--hf", str(ckpt), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int = 32, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


# ---- the run ------------------------------------------------------------------------------------------------
def test_run_layout_and_provenance(run, ckpt):
    cfg = json.loads((run / "config.json").read_text())
    src = cfg["source"]
    assert src["path"] == str(ckpt.resolve()) and src["model_type"] == "deepseek_v3"
    assert src["eos_ids"] == [1, 5] and src["chat_template"] is True
    assert set(src["files_sha256"]) >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (run / name).read_bytes() == (ckpt / name).read_bytes()
    gen = json.loads((run / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 5] and gen["temperature"] == 0.6 and gen["top_p"] == 0.95
    assert not list(run.parent.glob(".*import-*"))  # no temp directory left


def test_load_tokenizer_picks_the_kind(run, tmp_path):
    assert isinstance(load_tokenizer(run), ImportedTokenizer)
    assert isinstance(load_tokenizer(run / "tokenizer.json"), ImportedTokenizer)
    own = Tokenizer.train(["hello world 123"] * 20, vocab_size=300)
    own.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)


# ---- tokenizer and chat template == transformers ------------------------------------------------------------
CONVERSATIONS = {
    "system-multiturn-think": MESSAGES,
    "one-user": [{"role": "user", "content": "Hi ☃ 你好 <think>not a tag in user text?</think>"}],
    "no-system": MESSAGES[1:],
    "reasoning-field": [*MESSAGES[:2], {"role": "assistant", "content": "42", "reasoning_content": "12+30"},
                        MESSAGES[3]],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_ids_equal_apply_chat_template(run, hf_tok, name, gen_prompt):
    msgs = CONVERSATIONS[name]
    tok = load_tokenizer(run)
    theirs = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True)["input_ids"]
    assert tok.chat_ids(msgs, add_generation_prompt=gen_prompt) == theirs
    assert tok.render_chat(msgs, gen_prompt) == hf_tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt,
                                                                            tokenize=False)


def test_encode_decode_and_special_ids_equal_transformers(run, hf_tok):
    tok = load_tokenizer(run)
    text = "<｜User｜>Ünïcödé 12 + 30 = 42 ☃<think>x</think><｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids) and tok.decode(ids, skip_special=True) == hf_tok.decode(
        ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.stop_ids == {hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids(EOT)}
    assert tok.vocab_size == len(hf_tok)
    assert tok.prompt_ids("hi") == hf_tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                              add_generation_prompt=True)["input_ids"]
    assert tok.document_ids("hi", "ok") == tok.prompt_ids("hi") + tok.encode("ok") + [tok.eos_id]


# ---- generation == transformers -------------------------------------------------------------------------------
def test_greedy_generation_equals_transformers(run, hf_tok, hf_model):
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    engine = load_engine(str(run))
    assert engine.tokenizer.chat_ids(MESSAGES) == prompt
    theirs = hf_greedy(hf_model, prompt)
    out = engine.generate([prompt], 32)[0]
    assert out.tokens == theirs
    assert len(theirs) == 32 or theirs[-1] in (1, 5)


def test_padded_embedding_rows_never_sampled(tmp_path):
    """Embedding 24 rows past the tokenizer, those rows' head weights x8 so the unmasked argmax picks them: the
    engine equals transformers generate with those ids suppressed, and transformers without suppression differs."""
    ckpt = build_checkpoint(tmp_path / "padded", pad_rows=24, seed=1, q_lora_rank=None)  # the lean decode path
    run = import_checkpoint(ckpt, tmp_path / "run", verbose=False)
    tok = load_tokenizer(run)
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    n = tok.vocab_size
    assert hf.config.vocab_size == n + 24
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    unmasked = hf_greedy(hf, prompt, 16)
    assert max(unmasked) >= n  # the test bites: without the mask a padded row is chosen
    theirs = hf_greedy(hf, prompt, 16, suppress_tokens=list(range(n, n + 24)))
    engine = load_engine(str(run))
    engine.model.prepare_inference(True)
    assert decode.supported(engine.model, engine.dtype)  # the lean decode path runs
    engine.model.prepare_inference(False)
    assert engine.generate([prompt], 16)[0].tokens == theirs
    sampled = engine.generate([prompt] * 4, 16, temperature=1.5, seed=[0, 1, 2, 3])
    assert all(max(g.tokens) < n for g in sampled)
    from nanoseek.engine.batcher import Batcher, Request  # the server's decode loop
    from nanoseek.engine.sampling import SamplingParams

    batcher = Batcher(engine.model, tok.stop_ids, max_slots=2, sample_vocab=tok.sample_vocab)
    reqs = [batcher.submit(Request(prompt, 16, SamplingParams(t), 0)) for t in (0.0, 1.5)]
    while batcher.n_active or batcher.n_pending:
        batcher.step()
    assert reqs[0].tokens == theirs and max(reqs[1].tokens) < n


def test_every_eos_id_stops(run):
    """generation_config.json lists eos ids [1, 5]: token 5 (not the tokenizer's eos) ends a row everywhere."""
    from nanoseek.commands.sample import generate as sample_generate
    from nanoseek.engine import Engine
    from nanoseek.engine.batcher import Batcher, Request
    from nanoseek.engine.sampling import SamplingParams

    tok = load_tokenizer(run)
    eot = tok.id_of(EOT)
    assert eot != tok.eos_id and eot in tok.stop_ids
    engine = load_engine(str(run))
    model = engine.model
    real = model.logits

    def force_eot(h):  # the model wants EOT after its first token
        logits = real(h).clone()
        logits[..., eot] = 1e4
        return logits

    model.logits = force_eot
    try:
        out = Engine(model, tok, lean_decode=False).generate([tok.prompt_ids("hi")], 8)[0]
        assert out.tokens == [eot] and out.finish_reason == "stop" and out.text == ""
        batcher = Batcher(model, tok.stop_ids, max_slots=1, sample_vocab=tok.sample_vocab)
        req = Request(tok.prompt_ids("hi"), 8, SamplingParams(0.0), None)
        batcher.submit(req)
        while batcher.n_active or batcher.n_pending:
            batcher.step()
        assert req.tokens == [eot]
    finally:
        del model.logits

    class Fixed(torch.nn.Module):  # sample.py's uncached loop
        cfg = model.cfg

        def forward(self, x):
            logits = torch.zeros(1, x.size(1), model.cfg.vocab_size)
            logits[0, -1, eot if x.size(1) > 3 else 7] = 1.0
            return logits

    assert sample_generate(Fixed(), [0, 1, 2], 8, 0.0, tok.stop_ids) == [7, eot]
    stream = ChoiceStream(tok, chat=True)
    assert stream.feed(tok.encode("ok")[0]) and stream.feed(eot, "stop") == {}


# ---- the server ------------------------------------------------------------------------------------------------
def test_server_chat_uses_the_template_tokens(run, hf_tok, hf_model):
    from fastapi.testclient import TestClient

    from nanoseek.engine.server import ServeConfig, load_server

    server = load_server(run, ServeConfig(model_name="imp", max_slots=2))
    assert server.cfg.default_temperature == 0.6 and server.cfg.default_top_p == 0.95  # generation_config.json
    msgs = [Message(role="developer" if m["role"] == "system" else m["role"], content=m["content"]) for m in MESSAGES]
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert chat_prompt_ids(server.tokenizer, msgs) == prompt
    theirs = hf_greedy(hf_model, prompt, 12)
    with TestClient(server.app, base_url="http://127.0.0.1") as client:  # a loopback Host
        r = client.post("/v1/chat/completions", json={
            "model": "imp", "messages": [m.model_dump() for m in msgs], "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        body = r.json()
        sse = client.post("/v1/chat/completions", json={
            "model": "imp", "messages": [m.model_dump() for m in msgs], "temperature": 0, "max_tokens": 12,
            "stream": True})
    streamed: dict[str, str] = {}
    for line in sse.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                for k in ("content", "reasoning_content"):
                    streamed[k] = streamed.get(k, "") + (c["delta"].get(k) or "")
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == len(theirs)
    # the template's generation prompt opens <think>: the reply starts as reasoning, up to a </think>
    think, end = server.tokenizer.think_ids
    cut = theirs.index(end) if end in theirs else len(theirs)
    shown = [t for t in theirs if t not in server.tokenizer.stop_ids]
    expect_reasoning = hf_tok.decode([t for t in shown[:cut] if t != think], skip_special_tokens=True)
    msg = body["choices"][0]["message"]
    assert streamed == {"content": msg["content"], "reasoning_content": msg["reasoning_content"]}
    assert msg["reasoning_content"] == expect_reasoning
    assert msg["content"] == hf_tok.decode([t for t in theirs[cut + 1:] if t not in server.tokenizer.stop_ids
                                            and t != think], skip_special_tokens=True)


# ---- bad input --------------------------------------------------------------------------------------------------
def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "bad"))


def _edit_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


BAD = {
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "unknown-model-type": (lambda d: _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
                           "unknown model_type 'llama'"),
    "deepseek-v32-without-indexer": (lambda d: _edit_config(d, model_type="deepseek_v32"),
                                     "lacks required field(s): index_topk"),
    "deepseek-v4": (lambda d: _edit_config(d, model_type="deepseek_v4"), "not supported"),
    "v3-weights-labelled-v2": (lambda d: _edit_config(d, model_type="deepseek_v2"),
                               "unexpected key in checkpoint: model.layers.1.mlp.gate.e_score_correction_bias"),
    "v2-unknown-topk-method": (lambda d: _edit_config(d, model_type="deepseek_v2", topk_method="noaux_tc"),
                               "topk_method 'noaux_tc' is not supported"),
    "shape-mismatch": (lambda d: _edit_config(d, kv_lora_rank=24), "shape mismatch"),
    "missing-tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")),
                       "missing key in checkpoint: model.norm.weight"),
    "extra-tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
                     "unexpected key in checkpoint: model.extra.weight"),
    "truncated-shard": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
                        "truncated"),
    "vocab-over-embedding": (lambda d: _edit_config(d, vocab_size=300), "tokenizer has 322 tokens but the embedding"),
    "template-raises": (lambda d: (d / "chat_template.jinja").write_text("{{ raise_exception('nope') }}"),
                        "chat template raised: nope"),
    "template-loops": (lambda d: (d / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"), "ran longer than"),
    "template-internals": (lambda d: (d / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}"),
                           "refused by the sandbox"),
    "template-syntax": (lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}"),
                        "does not compile"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "bad-generation-config": (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'),
                              "eos_token_id must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written(ckpt, tmp_path, case, capsys):
    edit, expected = BAD[case]
    d = _copy(ckpt, tmp_path)
    edit(d)
    out = tmp_path / "runs" / "x"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        import_checkpoint(d, out, verbose=False)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temp directory left either
    assert main(["import", "--hf", str(d), "--out", str(out)]) == 2  # the CLI: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_existing_output_refused(run, ckpt):
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match="already exists"):
        import_checkpoint(ckpt, run, verbose=False)
    assert sorted(p.name for p in run.iterdir()) == before


def test_failure_while_writing_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import nanoseek.io as nio

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nio, "fsync_tree", boom)
    with pytest.raises(OSError):
        import_checkpoint(ckpt, tmp_path / "runs" / "x", verbose=False)
    assert list((tmp_path / "runs").iterdir()) == []


# ---- template bounds --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,expected", [
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{{ cycler.__init__.__globals__ }}", "sandbox"),
    ("{% set ns = namespace(_x=1) %}", "underscore"),
    ("{{ 'x' * 10**9 }}", "builds a value"),
    ("{{ 'x' | center(1000000000) }}", "passes 1000000000"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a value"),
    ("{% for i in range(100000) %}{{ 'abcdefghijklmnop' * 100 }}{% endfor %}", "renders more than"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer than"),
    ("{{ raise_exception('roles must alternate') }}", "raised: roles must alternate"),
    ("{{ '%0999999999d' % 1 }}", "width or precision"),
    ("{{ '{:>999999999}'.format(1) }}", "width or precision"),
    ("{{ '%0999999999d' | format(1) }}", "width or precision"),
    ("{{ ('x' * 1000).join(range(2000) | map('string') | list) }}", "builds a value"),
])
def test_template_bounds(source, expected):
    t0 = time.perf_counter()
    with pytest.raises(TemplateError) as e:
        # the time budget is cut short only for the case about time (a loaded machine must not hit it first)
        ChatTemplate(source).render(seconds=0.5 if "ran longer" in expected else 30, messages=[])
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10


def test_template_helpers_as_transformers():
    t = ChatTemplate("{{ {'a': 'é', 'b': [1, 2]} | tojson }}|{{ strftime_now('%Y') | length }}|{{ dict(x=1).x }}"
                     "|{{ 1700000000 | string }}|{{ '%d' % 1700000000 }}|{{ messages | map(attribute='role') | join }}"
                     "|{{ 'call 5551234567 %s' % 'x' }}|{{ '{} 1234567'.format(1) }}")
    assert t.render(messages=[{"role": "a"}, {"role": "b"}]) == ('{"a": "é", "b": [1, 2]}|4|1|1700000000|1700000000|ab'
                                                                '|call 5551234567 x|1 1234567')
    tagged = "{% for m in messages %}{% generation %}{{ m['role'] }}{% endgeneration %}{% endfor %}"
    from transformers.utils.chat_template_utils import render_jinja_template
    assert ChatTemplate(tagged).render(messages=[{"role": "a"}, {"role": "b"}]) == "ab" == render_jinja_template(
        [[{"role": "a", "content": ""}, {"role": "b", "content": ""}]], chat_template=tagged)[0][0]


# ---- the streaming safetensors writer ----------------------------------------------------------------------------
def test_write_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.tensor(2.5), "e": torch.zeros(0, 4), "f": torch.randn(4, 6).t()}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


# ---- the commands on an imported run --------------------------------------------------------------------------
def test_commands_run_on_imported_run(run, hf_tok, hf_model, capsys, monkeypatch, tmp_path):
    """generate / sample print transformers' greedy continuation of the template's prompt; eval and traces run;
    chat (multi-turn) renders the conversation through the template."""
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    theirs = hf_greedy(hf_model, prompt, 6)
    text = hf_tok.decode([t for t in theirs if t not in (1, 5)])
    assert main(["generate", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    assert text in capsys.readouterr().out
    assert main(["sample", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    assert main(["eval", "--run", str(run), "--n", "2", "--samples", "1", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 2
    assert main(["traces", "--run", str(run), "--problems", "2", "--samples", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "traces.jsonl")]) == 0
    capsys.readouterr()

    from rich.console import Console

    lines = iter(["hi", "/temperature 0", "again"])

    def fake_input(self, prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    seen = []
    real = ImportedTokenizer.chat_ids
    monkeypatch.setattr(Console, "input", fake_input)
    monkeypatch.setattr(ImportedTokenizer, "chat_ids", lambda self, m, add_generation_prompt=True: seen.append(
        [dict(x) for x in m]) or real(self, m, add_generation_prompt))
    assert main(["chat", "--run", str(run), "--multi-turn", "--max-new-tokens", "4"]) == 0
    assert [[x["role"] for x in m] for m in seen] == [["user"], ["user", "assistant", "user"]]
    assert seen[1][1]["content"].startswith("<think>")  # the reply began inside the template's open think block


def test_own_loader_refuses_an_imported_tokenizer(run):
    """nanoseek's Tokenizer.load never half-reads an imported checkpoint's tokenizer.json: it names the loader
    that reads it (every command uses that one; training on imported runs: tests/test_hf_import_train.py)."""
    with pytest.raises(ConfigError, match="belongs to an imported checkpoint.*load_tokenizer"):
        Tokenizer.load(run / "tokenizer.json")


@pytest.mark.parametrize("where", ["tokenizer_config", "named-list", "dict-special-tokens"])
def test_older_tokenizer_config_layouts(ckpt, tmp_path, where):
    """The template inside tokenizer_config.json (a string, or a list of named templates), special tokens written
    as AddedToken dicts with an added_tokens_decoder (DeepSeek-V3's own layout): same tokens as transformers."""
    d = _copy(ckpt, tmp_path)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": template}] if where == "named-list" else template
    if where == "dict-special-tokens":
        tok = json.loads((d / "tokenizer.json").read_text())
        cfg["added_tokens_decoder"] = {str(t["id"]): {**{k: t[k] for k in ("content", "lstrip", "normalized",
                                                                            "rstrip", "single_word", "special")}}
                                       for t in tok["added_tokens"]}
        for name in ("bos_token", "eos_token", "pad_token"):
            cfg[name] = {"__type": "AddedToken", "content": cfg[name], "lstrip": False, "normalized": True,
                         "rstrip": False, "single_word": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    run = import_checkpoint(d, tmp_path / "run", verbose=False)
    hf_tok = AutoTokenizer.from_pretrained(d)
    theirs = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert load_tokenizer(run).chat_ids(MESSAGES) == theirs
