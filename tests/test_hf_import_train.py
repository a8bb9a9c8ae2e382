"""Training an imported checkpoint: sft (incl. conversations), rl, distill, dpo on a run made by `nanoseek import`,
and `export --hf` back to a transformers directory, against transformers on checkpoints built here
(tests/hf_fixture.py: random DeepseekV3 weights, a BPE tokenizer with DeepSeek specials, a chat template):

* the tokenizer interface: nanoseek's own and the imported tokenizer answer every call of ChatTokenizer;
* sft on `messages`: the ids equal `apply_chat_template(messages)` and the trained-token mask equals transformers'
  own `assistant_masks` (the same template with `{% generation %}` tags) and a mask computed by hand from the
  role and eos tokens; a template that breaks the prefix property is refused in one line (R1's generation prompt
  opens `<think>`; a Qwen3-like one drops earlier turns' reasoning); a template with `{% generation %}` tags is
  read as transformers reads it (mask == `assistant_masks`, V3- and R1-style);
* rl: rollout prompts are the template's generation prompts token for token, the reward parser sees the prompt's
  open `<think>` with the reply, and the trainer's log-probs equal the engine's on an embedding padded past the
  tokenizer (padded rows out of the softmax: without that they differ by more than 0.1);
* sft / rl / distill / dpo each write a run that loads, with the checkpoint's tokenizer files copied;
* export --hf of a fine-tuned imported run, and of a nanoseek run: transformers loads it with the same logits
  and its apply_chat_template gives nanoseek's prompt ids;
* bad input: one line, nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_module

transformers = require_module("transformers")
from hf_fixture import MESSAGES, TEMPLATE_V3, build_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanoseek.cli import main  # noqa: E402
from nanoseek.commands.generate import load_engine  # noqa: E402
from nanoseek.config import ConfigError  # noqa: E402
from nanoseek.engine.sampling import mask_vocab  # noqa: E402
from nanoseek.hf_import import import_checkpoint  # noqa: E402
from nanoseek.hf_tokenizer import ImportedTokenizer, load_tokenizer  # noqa: E402
from nanoseek.model.transformer import IGNORE  # noqa: E402
from nanoseek.tokenizer import ChatTokenizer, Tokenizer  # noqa: E402
from nanoseek.train.checkpoint import load_run_model  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PAD_ROWS = 8
CONVERSATION = [*MESSAGES, {"role": "assistant", "content": "7 * 6 = 42."}]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module")
def v3ck(tmp_path_factory) -> Path:
    """V3-style template (the prefix property holds); embedding padded by PAD_ROWS rows that win unmasked."""
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "v3", pad_rows=PAD_ROWS, seed=3, template=TEMPLATE_V3)


@pytest.fixture(scope="module")
def v3run(v3ck, tmp_path_factory) -> Path:
    return import_checkpoint(v3ck, tmp_path_factory.mktemp("runs") / "v3", verbose=False)


@pytest.fixture(scope="module")
def r1ck(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "r1")  # R1-style template: generation prompt opens <think>


@pytest.fixture(scope="module")
def r1run(r1ck, tmp_path_factory) -> Path:
    return import_checkpoint(r1ck, tmp_path_factory.mktemp("runs") / "r1", verbose=False)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [{"messages": CONVERSATION}, {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_run(v3run, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert main(["sft", "--init", str(v3run), "--data", str(sft_data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "128", "--lr", "1e-2"]) == 0
    return out


def assert_self_contained(run: Path, source: Path) -> None:
    """A run made from an imported one: loadable, the imported tokenizer, the source's tokenizer files."""
    model, _, _ = load_run_model(run)
    assert isinstance(load_tokenizer(run), ImportedTokenizer)
    for name in TOKENIZER_FILES:
        assert (run / name).read_bytes() == (source / name).read_bytes(), name
    assert model.cfg.vocab_size == load_run_model(source)[0].cfg.vocab_size


# ---- one interface ----------------------------------------------------------------------------------------
def test_both_tokenizers_answer_every_call(v3run, tmp_path):
    own = Tokenizer.train(["hello world 123"] * 20, vocab_size=300)
    imported = load_tokenizer(v3run)
    members = [m for m in dir(ChatTokenizer) if not m.startswith("_")] + list(ChatTokenizer.__annotations__)
    for tok in (own, imported):
        for m in members:
            assert hasattr(tok, m), (type(tok).__name__, m)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    for tok in (own, imported):
        ids, mask = tok.chat_document(msgs)
        assert ids == tok.chat_ids(msgs, add_generation_prompt=False) and len(mask) == len(ids)
        assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=True) == "ok"
        assert tok.sample_vocab == tok.vocab_size and tok.eos_id in tok.stop_ids


# ---- conversations through the imported template ------------------------------------------------------------
def _tagged(template: str) -> str:
    """The same template with the assistant's content + eos inside {% generation %} (transformers' mask tag)."""
    out = template.replace("{{- '<｜Assistant｜>' + m['content'] + eos_token -}}",
                           "{{- '<｜Assistant｜>' -}}{% generation %}{{- m['content'] + eos_token -}}{% endgeneration %}")
    assert out != template
    return out


@pytest.mark.parametrize("n_msgs", [3, 5])
def test_conversation_mask_equals_transformers(v3run, v3ck, n_msgs):
    """ids == apply_chat_template(msgs); mask == transformers' assistant_masks of the {% generation %}-tagged
    template == by hand: every token after an assistant role token up to and including its eos."""
    msgs = CONVERSATION[:n_msgs]
    hf_tok = AutoTokenizer.from_pretrained(v3ck)
    tok = load_tokenizer(v3run)
    ids, mask = tok.chat_document(msgs)
    theirs = hf_tok.apply_chat_template(msgs, chat_template=_tagged(TEMPLATE_V3), return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert ids == theirs["input_ids"] == hf_tok.apply_chat_template(msgs)["input_ids"]
    assert mask == [bool(m) for m in theirs["assistant_masks"]]
    role, eos = hf_tok.convert_tokens_to_ids("<｜Assistant｜>"), hf_tok.eos_token_id
    by_hand, inside = [], False
    for t in theirs["input_ids"]:
        by_hand.append(inside)
        inside = (inside or t == role) and t != eos
    assert mask == by_hand and sum(mask) > 10

    from nanoseek.train.sft import encode_examples  # what sft trains: position t predicts token t + 1
    ids_t, tgt, skipped = encode_examples([{"messages": msgs}], tok, 200)
    assert skipped == 0 and ids_t[0, :len(ids)].tolist() == ids
    trained = [t + 1 for t in range(tgt.size(1)) if tgt[0, t] != IGNORE]
    assert trained == [i for i, m in enumerate(mask) if m]


R1_TAGGED = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}
{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}{% generation %}{{ m['content'].split('</think>')[-1] | trim
}}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>
{% endif %}"""


@pytest.mark.parametrize("template", ["v3", "r1"])
def test_generation_tags_are_read(r1run, template, tmp_path):
    """A template with {% generation %} marks its own assistant tokens: mask == transformers' assistant_masks
    (even R1-style, whose prefixes do not line up: the template's author chose what to train)."""
    source = _tagged(TEMPLATE_V3) if template == "v3" else R1_TAGGED
    d = tmp_path / template
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (d / name).write_bytes((r1run / name).read_bytes())
    (d / "chat_template.jinja").write_text(source)
    tok, hf_tok = ImportedTokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    ids, mask = tok.chat_document(CONVERSATION)
    theirs = hf_tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == theirs["input_ids"] and mask == [bool(m) for m in theirs["assistant_masks"]]
    assert tok.decode([i for i, m in zip(ids, mask) if m]).count(hf_tok.eos_token) == 2


def test_templates_without_the_prefix_property_are_refused(r1run, tmp_path):
    """R1: the generation prompt opens <think> while a rendered turn drops the reasoning. Qwen3-like: the last
    turn keeps its reasoning, an earlier one loses it once a user message follows. Each: one line."""
    with pytest.raises(ConfigError) as e:
        load_tokenizer(r1run).chat_document(CONVERSATION)
    assert "does not render assistant message 2 as its generation prompt" in str(e.value)
    assert "<think>" in str(e.value) and "\n" not in str(e.value).replace("\\n", "")
    d = tmp_path / "qwen3ish"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (d / name).write_bytes((r1run / name).read_bytes())
    (d / "chat_template.jinja").write_text(TEMPLATE_V3.replace(
        "{{- '<｜Assistant｜>' + m['content'] + eos_token -}}",
        "{{- '<｜Assistant｜>' + (m['content'] if loop.last else m['content'].split('</think>')[-1]) + eos_token -}}"))
    tok = ImportedTokenizer.from_dir(d)
    ids, mask = tok.chat_document(CONVERSATION[:3])  # the reasoning turn last: fine
    assert "12 + 30 = 42" in tok.decode([i for i, m in zip(ids, mask) if m])
    with pytest.raises(ConfigError, match="differently once later messages follow"):
        tok.chat_document(CONVERSATION)


def test_sft_on_conversations_refused_in_one_line(r1run, sft_data, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(r1run), "--data", str(sft_data), "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: example 1: the chat template does not render")
    assert not out.exists()


def test_sft_run_on_an_imported_run(sft_run, v3run):
    assert_self_contained(sft_run, v3run)
    rows = [json.loads(x) for x in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["loss"] < rows[0]["loss"]  # lr 1e-2 on two rows: it learns
    before, after = load_run_model(v3run)[0].state_dict(), load_run_model(sft_run)[0].state_dict()
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_completion_loss_leaves_padded_rows_out(v3run):
    """sft's CE over the tokenizer's vocabulary == CE of the logits with the padded rows at -inf (the engine's
    mask_vocab), and != CE over the whole padded embedding."""
    from nanoseek.train.sft import completion_loss, encode_examples

    tok = load_tokenizer(v3run)
    model = load_run_model(v3run)[0]
    ids, tgt, _ = encode_examples([{"messages": CONVERSATION}], tok, 128)
    n = float((tgt != IGNORE).sum())
    with torch.no_grad():
        got = completion_loss(model, ids, tgt, n, tok.sample_vocab)
        logits = mask_vocab(model(ids[:, :-1]), tok.sample_vocab)
        ref = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum") / n
        whole = completion_loss(model, ids, tgt, n)
    assert model.cfg.vocab_size == tok.vocab_size + PAD_ROWS
    assert torch.allclose(got, ref, rtol=1e-6) and (whole - got).abs() > 0.1


# ---- rl ---------------------------------------------------------------------------------------------------
def test_rl_prompts_are_the_template_and_the_reward_sees_the_open_think(r1run, r1ck, monkeypatch):
    from nanoseek.tasks import get_task
    from nanoseek.tasks.base import Problem
    from nanoseek.train.grpo import GRPOConfig, ProblemSampler, rollout_groups

    hf_tok = AutoTokenizer.from_pretrained(r1ck)
    engine = load_engine(str(r1run))
    tok = engine.tokenizer
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=6).validate()
    sampler = ProblemSampler(cfg)
    seen: dict[str, list] = {"prompts": [], "problems": [], "texts": []}
    real_generate, real_score = engine.generate, sampler.task.score_batch
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: seen["prompts"].extend(prompts)
                        or real_generate(prompts, **kw))
    monkeypatch.setattr(sampler.task, "score_batch", lambda probs, texts, trunc: seen["problems"].extend(probs)
                        or seen["texts"].extend(texts) or real_score(probs, texts, trunc))
    rollouts, _ = rollout_groups(engine, sampler, cfg, 2, 1, seed=0)
    assert len(seen["prompts"]) == len(rollouts) == 4
    for prompt, problem, text, r in zip(seen["prompts"], seen["problems"], seen["texts"], rollouts):
        assert prompt == r.prompt == hf_tok.apply_chat_template([{"role": "user", "content": problem.prompt}],
                                                                add_generation_prompt=True)["input_ids"]
        reply = tok.decode([t for t in r.tokens if t not in tok.stop_ids])
        rendered = hf_tok.apply_chat_template([{"role": "user", "content": problem.prompt}],
                                              add_generation_prompt=True, tokenize=False)
        assert rendered.endswith("<think>\n\n") and text == rendered[rendered.rindex("<think>"):] + reply
    task = get_task("arithmetic")  # a right, well-formed reply after R1's "<think>\n" generation prompt
    problem, prompt = Problem("2 + 2", "4"), tok.prompt_ids("2 + 2")
    reply = "2 + 2 = 4</think><answer>4</answer>"
    assert tok.opens_thinking(prompt) and not task.score(problem, reply).format_ok
    score = task.score(problem, tok.completion_text(prompt, reply))
    assert score.correct and score.format_ok
    from nanoseek.train.traces import Sample, select  # traces: scored with the opening, the row keeps the reply
    opened = tok.completion_text(prompt, "")
    assert select(task, problem, [Sample(reply, 9, False)]) == []
    assert [s.text for _, s, _ in select(task, problem, [Sample(reply, 9, False, opened)])] == [reply]


def test_rl_logprobs_equal_the_engines_on_a_padded_embedding(v3run):
    """The engine samples over the tokenizer's vocabulary; the trainer's log-probs (plain and packed, through
    policy_update) must use the same support: engine-vs-trainer difference ~0, and > 0.1 without the mask."""
    from nanoseek.train.common import Dist
    from nanoseek.train.grpo import GRPOConfig, Rollout, batch_tensors, policy_update, token_logprobs

    engine = load_engine(str(v3run))
    tok, model = engine.tokenizer, engine.model
    assert model.cfg.vocab_size == tok.sample_vocab + PAD_ROWS
    prompts = [tok.prompt_ids("What is 12 + 30?")] * 2 + [tok.prompt_ids("And 7 * 6?")] * 2
    outs = engine.generate(prompts, 8, temperature=1.0, seed=[0, 1, 2, 3])
    assert all(max(o.tokens) < tok.sample_vocab for o in outs)
    rs = [Rollout(p, o.tokens, o.logprobs, o.finish_reason == "length", float(i % 2), bool(i % 2), True, i // 2)
          for i, (p, o) in enumerate(zip(prompts, outs))]
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=8, lr=1e-9).validate()
    ids, mask, old, targets = batch_tensors(rs, "cpu")
    with torch.no_grad():
        got, _ = token_logprobs(model, ids, targets, cfg.sampling(), tok.sample_vocab)
        unmasked, _ = token_logprobs(model, ids, targets, cfg.sampling())
    assert float(((got - old).abs() * mask).max()) < 1e-4
    assert float(((unmasked - old).abs() * mask).max()) > 0.1  # the test bites without the mask
    out = policy_update(model, None, torch.optim.SGD(model.parameters(), lr=0.0), rs,
                        torch.tensor([1.0, -1.0, 1.0, -1.0]), cfg, Dist(), first=True, vocab=tok.sample_vocab)
    assert out["rows_trained"] == 4 and out["logp_diff_max"] < 1e-4


def test_rl_distill_dpo_write_self_contained_runs(v3run, sft_run, tmp_path, monkeypatch):
    import nanoseek.train.grpo as grpo

    vocabs, real_update = [], grpo.policy_update
    monkeypatch.setattr(grpo, "policy_update", lambda *a, **kw: vocabs.append(kw.get("vocab")) or real_update(*a, **kw))
    rl = tmp_path / "rl"
    assert main(["rl", "--init", str(v3run), "--out", str(rl), "--steps", "1", "--group-size", "2",
                 "--prompts-per-step", "2", "--max-new-tokens", "6"]) == 0
    assert_self_contained(rl, v3run)
    assert vocabs == [load_tokenizer(v3run).vocab_size]  # the update's log-probs leave the padded rows out
    distill = tmp_path / "distill"
    assert main(["distill", "--teacher", str(v3run), "--student", str(sft_run), "--out", str(distill), "--steps",
                 "1", "--prompts-per-step", "2", "--max-new-tokens", "6"]) == 0
    assert_self_contained(distill, v3run)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5, I think"}) + "\n")
    dpo = tmp_path / "dpo"
    assert main(["dpo", "--init", str(sft_run), "--data", str(pairs), "--out", str(dpo), "--steps", "1",
                 "--batch-size", "1"]) == 0
    assert_self_contained(dpo, v3run)
    merged = tmp_path / "merged"
    assert main(["merge", "--runs", str(sft_run), str(dpo), "--out", str(merged)]) == 0
    assert_self_contained(merged, v3run)
    rec = json.loads((dpo / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(rec["loss"] - 0.6931) < 1e-3  # step 1: policy == reference, -log sigmoid(0)


def test_distill_refuses_a_student_with_another_tokenizer(v3run, tmp_path, capsys):
    from tiny_runs import write_tiny_run

    student = write_tiny_run(tmp_path / "native", ["What is 12 + 30? 42"] * 20)
    assert main(["distill", "--teacher", str(v3run), "--student", str(student), "--out", str(tmp_path / "d"),
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different tokenizers" in err[0] and not (tmp_path / "d").exists()


# ---- export --hf ------------------------------------------------------------------------------------------
def _logits_agree(hf_dir: Path, run: Path, ids: list[int]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_run_model(run)[0].float()
    with torch.no_grad():
        a, b = hf(torch.tensor([ids])).logits, ours(torch.tensor([ids]))
    assert (a - b).abs().max() / b.abs().max() < 1e-4


def test_export_fine_tuned_imported_run_round_trip(sft_run, v3ck, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(sft_run), "--hf", str(out)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (v3ck / name).read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 5] and gen["temperature"] == 0.6
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids == load_tokenizer(sft_run).chat_ids(MESSAGES)
    _logits_agree(out, sft_run, ids)
    assert not list(tmp_path.glob(".*export-*"))


def test_v2_rl_run_exports(tmp_path):
    """DeepSeek-V2's softmax gate has no selection bias: rl leaves nanoseek's at zero (the bias update is off for
    a softmax gate), so the RL'd run exports as DeepseekV2ForCausalLM with the same logits."""
    ckpt = build_checkpoint(tmp_path / "v2ck", arch="v2", seed=4)
    run = import_checkpoint(ckpt, tmp_path / "v2", verbose=False)
    rl, out = tmp_path / "v2-rl", tmp_path / "v2-hf"
    assert main(["rl", "--init", str(run), "--out", str(rl), "--steps", "1", "--group-size", "2",
                 "--prompts-per-step", "2", "--max-new-tokens", "6"]) == 0
    assert json.loads((rl / "config.json").read_text())["rl"]["bias_update"] is False
    assert main(["export", "--run", str(rl), "--hf", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DeepseekV2ForCausalLM"]
    _logits_agree(out, rl, load_tokenizer(rl).chat_ids(MESSAGES))


def test_export_nanoseek_run_carries_its_chat_format(tmp_path):
    """A run with nanoseek's own tokenizer: transformers' apply_chat_template of the exported directory gives
    nanoseek's chat ids; re-importing the export gives the same prompts."""
    from tiny_runs import write_tiny_run

    run = write_tiny_run(tmp_path / "native", ["What is 12 + 30? The answer is 42."] * 20)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--hf", str(out)]) == 0
    own, hf_tok = load_tokenizer(run), AutoTokenizer.from_pretrained(out)
    convo = [{"role": "system", "content": "Be brief."}, *MESSAGES[1:]]
    for gen_prompt in (True, False):
        assert hf_tok.apply_chat_template(convo, add_generation_prompt=gen_prompt)["input_ids"] == own.chat_ids(
            convo, add_generation_prompt=gen_prompt)
    _logits_agree(out, run, own.prompt_ids("What is 12 + 30?"))
    back = import_checkpoint(out, tmp_path / "reimported", verbose=False)
    assert load_tokenizer(back).prompt_ids("What is 12 + 30?") == own.prompt_ids("What is 12 + 30?")


def test_export_bad_input_one_line(sft_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(json.loads((sft_run / "config.json").read_text())))
    for name in TOKENIZER_FILES:
        (empty / name).write_bytes((sft_run / name).read_bytes())
    cases = [(["--run", str(sft_run), "--hf", str(taken)], "already exists"),
             (["--run", str(empty), "--hf", str(tmp_path / "x")], "has no checkpoint"),
             (["--run", str(tmp_path / "nope"), "--hf", str(tmp_path / "y")], "nope"),
             (["--run", str(sft_run), "--hf", str(tmp_path / "z"), "--step", "99"], "no checkpoint for step 99")]
    for args, expected in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "taken"]
