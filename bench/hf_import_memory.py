"""Peak memory of `nanoseek.hf.from_hf` on a synthetic sharded checkpoint of about 1B parameters.

The bench writes a transformers DeepseekV3ForCausalLM directory (config.json, bf16 safetensors shards of
--shard-mb each, model.safetensors.index.json) into a temporary directory, tensor by tensor (it never holds
the whole model), then imports it in fresh subprocesses, one per variant, and reports each one's peak
resident set size (VmHWM from /proc/self/status, which also counts the mapped shard pages) against the
checkpoint's size on disk. The directory is deleted afterwards.

Variants: `new` keeps the checkpoint's bf16 (the default, dtype=None); `new-fp32` asks for float32 (a model
twice the file's size, so ~2x is the floor); `old` is from_hf as of commit c43e4b6 (git show), which rebuilt
state_dict() per key, reopened the file per tensor and always loaded float32; `import` is the whole
`nanoseek import` (nanoseek.hf_import: checks, from_hf, the tokenizer files, and the run's model.safetensors
written tensor by tensor) into a run beside the checkpoint (the checkpoint carries a small BPE tokenizer).
Also printed: RSS of the bare interpreter + torch before the load (`base`), and the wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.hf import config_to_hf, hf_name  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

OLD_COMMIT = "c43e4b6"

# ~1.03B parameters: 8 layers (1 dense), 16 routed + 1 shared experts of 1024, MLA with 16 heads, no MTP
BENCH_CFG = ModelConfig(vocab_size=32000, dim=2048, inter_dim=5632, moe_inter_dim=1024, n_layers=8,
                        n_dense_layers=1, n_heads=16, n_routed_experts=16, n_shared_experts=1,
                        n_activated_experts=4, n_expert_groups=1, n_limited_groups=1, q_lora_rank=0,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        max_seq_len=4096, original_seq_len=4096, n_mtp=0)


def write_checkpoint(path: Path, cfg: ModelConfig, shard_bytes: int) -> tuple[int, int, int]:
    """Random bf16 weights (norms 1) written shard by shard; returns (parameters, bytes on disk, shards)."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {hf_name(k, cfg.n_layers): (k, tuple(t.shape)) for k, t in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, n_params, weight_map = 0, 0, {}

    def flush(final: bool) -> None:
        i = len(shards)
        name = f"model-{i:05d}-of-TOTAL.safetensors"
        save_file(shards[-1], path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[-1]})
        shards[-1] = {}
        if not final:
            shards.append({})

    for hk, (ours, shape) in shapes.items():
        if ours.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        n = t.numel() * 2
        if shards[-1] and size + n > shard_bytes:
            flush(final=False)
            size = 0
        shards[-1][hk] = t
        size += n
        n_params += t.numel()
    flush(final=True)
    total = len(shards)
    for f in sorted(path.glob("*-of-TOTAL.safetensors")):
        f.rename(path / f.name.replace("TOTAL", f"{total:05d}"))
    weight_map = {k: v.replace("TOTAL", f"{total:05d}") for k, v in weight_map.items()}
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": disk},
                                                                   "weight_map": weight_map}))
    hf_cfg = config_to_hf(cfg)
    hf_cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(hf_cfg))
    write_tokenizer(path)
    return n_params, disk, total


def write_tokenizer(path: Path) -> None:
    """A small byte-level BPE (the embedding is padded past it) with bos / eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"}))


def vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(ckpt: str, variant: str, old_file: str | None) -> None:
    if variant == "old":
        import importlib.util
        spec = importlib.util.spec_from_file_location("nanoseek_hf_old", old_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from_hf = mod.from_hf
        kw = {}
    else:
        from nanoseek.hf import from_hf
        kw = {"dtype": torch.float32} if variant == "new-fp32" else {}
    base = vm("VmRSS")
    t0 = time.perf_counter()
    if variant == "import":
        from nanoseek.hf_import import import_checkpoint

        run = import_checkpoint(ckpt, Path(ckpt).parent / "run-import", verbose=False)
        dt = time.perf_counter() - t0
        weights = run / "checkpoints" / "step_0" / "model.safetensors"
        from safetensors import safe_open
        with safe_open(weights, "pt") as f:
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
        print(json.dumps({"base": base, "peak": vm("VmHWM"), "seconds": dt, "param_bytes": weights.stat().st_size,
                          "dtypes": dtypes}))
        shutil.rmtree(run)
        return
    model = from_hf(ckpt, verbose=False, **kw)
    dt = time.perf_counter() - t0
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": vm("VmHWM"), "seconds": dt, "param_bytes": param_bytes,
                      "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--variants", default="new,new-fp32,old", help="comma-separated: new, new-fp32, old, import")
    ap.add_argument("--layers", type=int, default=BENCH_CFG.n_layers, help="smaller for a quick smoke run")
    ap.add_argument("--experts", type=int, default=BENCH_CFG.n_routed_experts)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "VARIANT", "OLD_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2] if args.child[2] != "-" else None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="nanoseek-hf-mem-", dir=args.dir))
    try:
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        t0 = time.perf_counter()
        cfg = dataclasses.replace(BENCH_CFG, n_layers=args.layers, n_routed_experts=args.experts,
                                  n_activated_experts=min(BENCH_CFG.n_activated_experts, args.experts))
        n_params, disk, n_shards = write_checkpoint(ckpt, cfg.validate(), args.shard_mb * 2 ** 20)
        print(f"checkpoint: {n_params:,} parameters, bf16, {n_shards} shards, {disk / 2**30:.2f} GiB on disk "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        old_file = "-"
        if "old" in args.variants:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:nanoseek/hf.py"],
                                 capture_output=True, text=True)
            if src.returncode != 0:
                print(f"old: skipped (git show {OLD_COMMIT} failed: {src.stderr.strip()})")
                args.variants = ",".join(v for v in args.variants.split(",") if v != "old")
            else:
                old_file = str(tmp / "hf_old.py")
                Path(old_file).write_text(src.stdout)
        print(f"{'variant':<9} {'dtype':<15} {'base GiB':>8} {'peak GiB':>8} {'peak/disk':>9} "
              f"{'(peak-base)/disk':>16} {'model/disk':>10} {'seconds':>8}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), variant, old_file],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{variant:<9} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant:<9} {','.join(d.replace('torch.', '') for d in r['dtypes']):<15} "
                  f"{r['base'] / 2**30:8.2f} {r['peak'] / 2**30:8.2f} {r['peak'] / disk:9.2f} "
                  f"{(r['peak'] - r['base']) / disk:16.2f} {r['param_bytes'] / disk:10.2f} {r['seconds']:8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
