"""Scale-out beyond data parallelism (V3 report sec. 3.2, 3.4): expert parallelism with redundant experts placed by
EPLB (`eplb`, `expert_parallel`). See docs/parallel.md."""
