# Every target bootstraps .venv on a fresh machine: torch==2.13.0 first (the CPU wheel on disk),
# then the package with its dev extras, so a bare `torch` requirement never pulls a CUDA build.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: llamacpp bench-llamacpp demo r1 lm test test-slow bench bench-serve bench-soak bench-grpo bench-distill bench-spec bench-verifiers bench-parallel bench-precision bench-ablations aha lint venv

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m nanoseek.cli demo

# the R1 pipeline after the demo (reuses runs/demo, runs it first if missing): distillation vs RL on a dense student
r1: $(VENV_STAMP)
	$(PY) -m nanoseek.cli r1

# long reasoning in miniature: reflection RL, then long2short compared (resumable; docs/long_reasoning.md)
aha: $(VENV_STAMP)
	$(PY) -m nanoseek.cli aha

# a language model of real text every machine has (the Python standard library's sources), ~15 min on 2 cores;
# resumable; report in runs/lm/report.md (docs/lm.md)
lm: $(VENV_STAMP)
	$(PY) -m nanoseek.cli lm

# optional: llama-cpp-python (compiles llama.cpp; not part of `make test`'s install). Then `make test-slow` runs
# tests/test_gguf_llamacpp.py and `make bench-llamacpp` the decode comparison (bench/vs_llamacpp.py)
llamacpp: $(VENV_STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q 'llama-cpp-python==0.3.36'  # = the llamacpp extra

# THREADS=1: both sides on one thread (what a machine with one busy core can measure); default 2
bench-llamacpp: $(VENV_STAMP)
	$(if $(THREADS),OMP_NUM_THREADS=$(THREADS) ,)$(PY) bench/vs_llamacpp.py $(if $(RUN),--run $(RUN),) $(if $(THREADS),--threads $(THREADS),)

test: $(VENV_STAMP)
	$(PY) -m pytest tests

test-slow: $(VENV_STAMP)
	$(PY) -m pytest tests -m slow

bench: $(VENV_STAMP)
	$(PY) bench/model_throughput.py
	$(PY) bench/generate.py

bench-serve: $(VENV_STAMP)
	$(PY) bench/serve_load.py

# normal streaming clients vs abusive ones for 60 s (tiny preset, random weights)
bench-soak: $(VENV_STAMP)
	$(PY) bench/serve_soak.py

# needs a pretrained run for a meaningful reward comparison: make bench-grpo INIT=runs/demo/base
bench-grpo: $(VENV_STAMP)
	$(PY) bench/grpo_vs_trl.py $(if $(INIT),--init $(INIT),)

# on-policy distillation step vs TRL's GKDTrainer: make bench-distill TEACHER=runs/demo/rl STUDENT=runs/r1/student_base
bench-distill: $(VENV_STAMP)
	$(PY) bench/distill_vs_trl.py $(if $(TEACHER),--teacher $(TEACHER) --student $(STUDENT),)

# MTP speculative vs plain decoding at batch 1 on a trained 12-layer model (pretrained first if missing,
# ~7 min on 2 cores): with 4 layers the MTP block alone costs ~40% of a decode step (README, engine)
SPEC_RUN := runs/spec_deep
bench-spec: $(VENV_STAMP)
	test -d $(SPEC_RUN)/checkpoints || $(PY) -m nanoseek.cli pretrain --config bench/configs/spec_deep.json \
		--task arithmetic --difficulty 1 --fact-share 0 --steps 600 --batch-size 32 --seq-len 64 --lr 4e-3 \
		--out $(SPEC_RUN)
	$(PY) bench/generate.py --spec $(SPEC_RUN) --rounds 5

# proof checks/s: warm Coq pool vs one coqc per proof; code / HumanEval / math checks/s (needs coq, bubblewrap)
bench-verifiers: $(VENV_STAMP)
	$(PY) bench/verifiers.py

# fp32 / bf16 / fp8 / fp8-tensor pretraining gaps, fixed-weight errors, activation memory (docs/precision.md);
# ~15 min per config and seed on 2 cores (FP8 runs ~10x slower than FP32 on a CPU)
# V3's ablations (bias/aux/none, MTP, MoE vs dense, AdamW vs Muon + QK-clip) on make lm's corpus, 3 seeds, one-ulp
# floor (docs/ablations.md; ~30 min on one quiet core)
bench-ablations: $(VENV_STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/ablations.py --steps 60 --seeds 3 --threads 1 --qk-clip-tau 0.3 \
		--arms bias,floor,aux,none,mtp0,dense,muon,muon-clip

bench-precision: $(VENV_STAMP)
	$(PY) bench/precision.py train --config tiny --steps 80 --seeds 0
	$(PY) bench/precision.py report
	$(PY) bench/precision.py fixed
	$(PY) bench/precision.py memory

lint: $(VENV_STAMP)
	$(PY) -m ruff check nanoseek tests bench

# pipeline schedules, EP all-to-all bytes, EPLB table (optional RUN=runs/NAME with recorded expert loads)
bench-parallel: $(VENV_STAMP)
	$(PY) bench/parallel.py $(if $(RUN),--run $(RUN),)
