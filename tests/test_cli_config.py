"""Each knob declared once (nanoseek.cli_config): every config field a command exposes is exactly one CLI
option, the defaults --help shows are the dataclass's, the flags of before the conversion still parse, the
resume rule holds (stored unless given), and --config-file / --print-config round-trip."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing

import pytest

from nanoseek.cli import main
from nanoseek.cli_config import knob
from nanoseek.commands import aha, demo, distill, dpo, lm, pretrain, r1, rl, sft
from nanoseek.commands.aha import AhaConfig
from nanoseek.recipes.demo import DemoConfig
from nanoseek.recipes.r1 import R1Config
from nanoseek.config import ConfigError
from nanoseek.recipes.lm import LMConfig
from nanoseek.train.distill import DistillConfig
from nanoseek.train.dpo import DPOConfig
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.pretrain import PretrainConfig
from nanoseek.train.sft import SFTConfig

COMMANDS = {"rl": (rl, GRPOConfig, ["--init", "x", "--out", "y"]), "sft": (sft, SFTConfig, ["--out", "y"]),
            "distill": (distill, DistillConfig, ["--out", "y"]), "dpo": (dpo, DPOConfig, ["--out", "y"]),
            "pretrain": (pretrain, PretrainConfig, ["--out", "y"]), "demo": (demo, DemoConfig, []),
            "aha": (aha, AhaConfig, []), "r1": (r1, R1Config, []), "lm": (lm, LMConfig, [])}

# every flag of each command before the conversion (from its hand-written add_arguments): all must still parse
OLD_FLAGS = {
    "rl": "--init --out --task --difficulty --steps --minutes --group-size --prompts-per-step --max-new-tokens "
          "--temperature --top-p --top-k --lr --mu --advantage --loss-agg --eps-low --eps-high --beta "
          "--dynamic-sampling --overlong-cache --mask-truncated --length-weight --length-warmup-steps --prioritized "
          "--pool-size --curriculum --no-bias-update --bias-gamma --partial-rollout-tokens --seed --ckpt-every "
          "--device --precision --compile --resume",
    "sft": "--out --init --preset --tokenizer --data --steps --epochs --minutes --lr --warmup --batch-size "
           "--grad-accum --seq-len --seed --ckpt-interval --keep-last --device --precision --compile --resume",
    "distill": "--teacher --student --task --difficulty --out --steps --minutes --prompts-per-step --max-new-tokens "
               "--temperature --lr --warmup --seed --ckpt-every --device --resume",
    "dpo": "--out --init --data --make-pairs --task --samples --max-new-tokens --beta --lr --steps --batch-size "
           "--seq-len --seed --resume",
    "pretrain": "--out --preset --config --dense --task --n-docs --n-test-docs --difficulty --flawed-share "
                "--fact-share --reflect-share --packing --steps --minutes --seed --batch-size --grad-accum --seq-len "
                "--lr --warmup --eval-interval --eval-batches --ckpt-interval --log-interval --keep-last --device "
                "--precision --pp --pp-schedule --pp-microbatches --compile --resume",
    "demo": "--out --seed --base-steps --rl-steps --eval-n --eval-samples --difficulty --base-lr --flawed-share --rl-lr "
            "--rl-bias-gamma --prompts-per-step --rl-temperature --smoke",
    "aha": "--out --seed --base-steps --rl-steps --length-steps --dpo-steps --eval-n --eval-samples --max-new-tokens "
           "--l2s-problems --give-up --diag-problems --length-weight --rl-temperature --until --smoke --seeds-report "
           "--reflection",  # issue 28: --cold-traces / --reflect-share / --flawed-share left with `aha --reflection`
    "lm": "--out --data --exclude --text-field --preset --minutes --vocab-size --batch-size --seq-len --lr --seed "
          "--eval-interval --eval-tokens --until",
    "r1": "--out --demo --seed --student-preset --student-base-steps --arm-minutes --trace-problems --trace-samples "
          "--smoke",
}


def parser_of(module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    module.add_arguments(p)
    return p


def leaf_names(cls) -> set[str]:
    """Every field name of `cls` and of its nested dataclass fields."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        out.add(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaf_names(hints[f.name])
    return out


def value_at(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", COMMANDS)
def test_each_field_is_one_option_and_no_option_is_written_by_hand(name):
    module, cls, _ = COMMANDS[name]
    actions = parser_of(module)._actions
    paths = [o.path for o in module.CLI.options]
    assert paths and len(set(paths)) == len(paths)
    dests = [a.dest for a in actions]
    for path in paths:
        assert dests.count(path) == 1, f"{name}: {path} is set by {dests.count(path)} options"
    fields = leaf_names(cls)
    by_hand = [a for a in actions if a.dest not in paths]
    for a in by_hand:  # an option outside the generated ones may not set or shadow a config field
        assert a.dest not in fields, f"{name}: {a.option_strings} duplicates config field {a.dest} by hand"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_defaults_are_the_dataclass_defaults(name):
    module, cls, required = COMMANDS[name]
    p = parser_of(module)
    defaults = cls()
    for o in module.CLI.options:
        action = next(a for a in p._actions if a.dest == o.path)
        assert action.default is None, f"{name}: {o.flag} carries its own argparse default"
        shown = re.search(r"\(default: ([^;)]*)", action.help).group(1)
        value = value_at(defaults, o.path)
        if o.path == "budget_s":  # distill --minutes: the field is in seconds
            value = value / 60
        assert shown == ("none" if value is None else str(value)), (name, o.flag, shown, value)
    # no option given: the resolved config is the dataclass's own default
    args = p.parse_args(required)
    assert module.CLI.resolve(args) == defaults


@pytest.mark.parametrize("name", COMMANDS)
def test_old_flags_still_parse(name):
    module, _, required = COMMANDS[name]
    p = parser_of(module)
    strings = {s for a in p._actions for s in a.option_strings}
    missing = [f for f in OLD_FLAGS[name].split() if f not in strings]
    assert not missing, f"{name} lost {missing}"


def test_flag_names_types_and_scales_map_to_their_fields():
    args = parser_of(rl).parse_args(["--init", "x", "--out", "y", "--no-bias-update", "--dynamic-sampling",
                                     "--top-k", "5", "--compile", "--advantage", "dr_grpo"])
    cfg = rl.CLI.resolve(args)
    assert (cfg.bias_update, cfg.dynamic_sampling, cfg.top_k, cfg.compile, cfg.advantage) == (False, True, 5, True,
                                                                                              "dr_grpo")
    cfg = sft.CLI.resolve(parser_of(sft).parse_args(["--out", "y", "--warmup", "3", "--minutes", "1.5"]))
    assert (cfg.train.warmup_steps, cfg.train.minutes, cfg.train.lr) == (3, 1.5, SFTConfig().train.lr)
    cfg = distill.CLI.resolve(parser_of(distill).parse_args(["--out", "y", "--minutes", "2", "--warmup", "4"]))
    assert (cfg.budget_s, cfg.train.warmup_steps, cfg.train.minutes) == (120.0, 4, 0.0)
    with pytest.raises(argparse.ArgumentError):
        parser_of(rl).parse_args(["--init", "x", "--out", "y", "--loss-agg", "mean"])


def test_smoke_recipes_take_options_on_top(capsys):
    assert main(["demo", "--smoke", "--out", "d", "--rl-steps", "3", "--print-config"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == dataclasses.asdict(dataclasses.replace(DemoConfig.smoke("d"), rl_steps=3))
    assert main(["r1", "--smoke", "--seed", "2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == dataclasses.asdict(R1Config.smoke_config("runs/r1", "runs/demo", 2))


def test_resume_keeps_stored_values_unless_an_override_is_given(tmp_path):
    stored = GRPOConfig(steps=7, minutes=3.0, temperature=0.7, precision="bf16")
    (tmp_path / "config.json").write_text(json.dumps({"rl": stored.to_dict(), "init": "x"}))
    base = ["--init", "x", "--out", str(tmp_path), "--resume"]
    cfg = rl.config_from_args(parser_of(rl).parse_args(base + ["--temperature", "1.3", "--steps", "9"]))
    # --steps overrides, --temperature (resume "keep") does not; --minutes / --precision stay stored
    assert (cfg.steps, cfg.temperature, cfg.minutes, cfg.precision) == (9, 0.7, 3.0, "bf16")
    cfg = rl.config_from_args(parser_of(rl).parse_args(base + ["--precision", "fp32"]))
    assert (cfg.steps, cfg.precision) == (7, "fp32")

    train = dataclasses.replace(SFTConfig().train, steps=11, lr=2e-3, minutes=4.0)
    s = SFTConfig(data="d.jsonl", init="r", train=train)
    (tmp_path / "config.json").write_text(json.dumps({"sft": s.to_dict()}))
    args = parser_of(sft).parse_args(["--out", str(tmp_path), "--resume", "--lr", "9", "--compile"])
    cfg = sft.CLI.resolve(args, s)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.minutes, cfg.train.compile) == (11, 2e-3, 4.0, True)
    cfg = sft.CLI.resolve(parser_of(sft).parse_args(["--out", "y", "--resume", "--steps", "12", "--seed", "3"]), s)
    assert (cfg.train.steps, cfg.train.seed, cfg.train.minutes) == (12, s.train.seed, 4.0)

    d = DistillConfig(teacher="t", student="s", budget_s=60.0)
    args = parser_of(distill).parse_args(["--out", "y", "--resume", "--minutes", "3", "--temperature", "2"])
    cfg = distill.CLI.resolve(args, d)
    assert (cfg.budget_s, cfg.temperature, cfg.train.steps) == (180.0, 1.0, d.train.steps)


def test_dpo_resume_keeps_stored_steps(tmp_path):
    stored = DPOConfig(init="r", data="p.jsonl", steps=40, beta=0.3)
    (tmp_path / "config.json").write_text(json.dumps({"dpo": dataclasses.asdict(stored)}))
    p = parser_of(dpo)
    cfg = dpo.CLI.resolve(p.parse_args(["--out", str(tmp_path), "--resume", "--beta", "0.9"]),
                          dpo.stored_config(tmp_path, DPOConfig, "dpo"))
    assert cfg == stored
    cfg = dpo.CLI.resolve(p.parse_args(["--out", str(tmp_path), "--resume", "--steps", "50"]), stored)
    assert cfg == dataclasses.replace(stored, steps=50)


def test_print_config_then_config_file_round_trips(tmp_path, capsys):
    assert main(["rl", "--init", "x", "--out", "y", "--lr", "3e-4", "--no-bias-update", "--print-config"]) == 0
    path = tmp_path / "rl.json"
    path.write_text(capsys.readouterr().out)
    assert main(["rl", "--init", "x", "--out", "y", "--config-file", str(path), "--seed", "5", "--print-config"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == GRPOConfig(lr=3e-4, bias_update=False, seed=5).to_dict()
    # a run's own config.json: its command section is used
    run = tmp_path / "config.json"
    run.write_text(json.dumps({"dpo": dataclasses.asdict(DPOConfig(beta=0.4)), "stage": "dpo"}))
    assert main(["dpo", "--out", "y", "--config-file", str(run), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["beta"] == 0.4
    # pretrain: the file's model holds unless --preset / --config replaces it
    assert main(["pretrain", "--out", "y", "--preset", "small", "--steps", "3", "--print-config"]) == 0
    path.write_text(capsys.readouterr().out)
    assert main(["pretrain", "--out", "y", "--config-file", str(path), "--print-config"]) == 0
    cfg = PretrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.train.steps == 3 and cfg.model.dim == PretrainConfig.from_dict(json.loads(path.read_text())).model.dim


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "learning_rate": 2}))
    assert main(["rl", "--init", "x", "--out", "y", "--config-file", str(bad)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["sft", "--out", "y", "--config-file", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for text in ("[1, 2]", json.dumps({"data": "x.jsonl"})):  # not an object; an SFTConfig without its train part
        bad.write_text(text)
        assert main(["sft", "--out", "y", "--config-file", str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(bad) in err
    (tmp_path / "config.json").write_text(json.dumps({"dpo": dataclasses.asdict(DPOConfig())}))
    with pytest.raises(ConfigError, match="--resume"):
        dpo.CLI.resolve(parser_of(dpo).parse_args(["--out", "y", "--resume", "--config-file", str(bad)]),
                        DPOConfig())


def test_knob_rejects_an_unknown_resume_rule():
    with pytest.raises(ValueError, match="resume"):
        knob(1, help="x", resume="sometimes")


@dataclasses.dataclass
class _Inner:
    rate: float = knob(0.5, help="a rate")
    hidden: int = 3  # no knob: not an option


@dataclasses.dataclass
class _Toy:
    paths: list[str] = knob(default_factory=list, help="input files")
    limit: int | None = knob(None, help="optional cap")
    on: bool = knob(True, help="a switch")
    budget_s: float = knob(0.0, flag="--minutes", scale=60.0, resume="override", help="budget")
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(rate=0.25))


def test_generated_options_on_a_hand_made_dataclass():
    from nanoseek.cli_config import ConfigCLI

    cli = ConfigCLI(_Toy)
    assert [(o.path, o.flag) for o in cli.options] == [("paths", "--paths"), ("limit", "--limit"), ("on", "--on"),
                                                       ("budget_s", "--minutes"), ("inner.rate", "--rate")]
    p = argparse.ArgumentParser(exit_on_error=False)
    cli.add_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    assert "(default: 0.25)" in helps["inner.rate"]  # the enclosing default instance's value, not _Inner's 0.5
    cfg = cli.resolve(p.parse_args(["--paths", "a.txt", "--paths", "b.txt", "--limit", "4", "--no-on", "--minutes", "1.5",
                                    "--rate", "0.1"]))
    assert cfg == _Toy(paths=["a.txt", "b.txt"], limit=4, on=False, budget_s=90.0, inner=_Inner(rate=0.1))
    assert cli.resolve(p.parse_args(["--paths", "a", "b"])).paths == ["a", "b"]
    assert cli.resolve(p.parse_args([])) == _Toy()
    stored = _Toy(paths=["s"], budget_s=30.0)
    assert cli.resolve(p.parse_args(["--paths", "x", "--minutes", "2"]), stored) == _Toy(paths=["s"], budget_s=120.0)
