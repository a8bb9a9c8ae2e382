"""Scale-out beyond data parallelism (V3 report sec. 3.2, 3.4): expert parallelism with redundant experts placed by
EPLB (`expert_parallel`, `eplb`, `loads`), the calls the trainers make to use it (`training`: pretrain, sft, rl)
and pipeline parallelism with torch.distributed.pipelining schedules (`pipeline`). See docs/parallel.md."""
