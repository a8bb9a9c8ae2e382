"""Multi-step math word problems (GSM8K-like), answers checked with math-verify in sandboxed worker processes.

R1's math reward checks the final answer with a rule (arXiv 2501.12948 sec. 2.2.2). Problems are generated
from templates over quantities, rates, fractions and percentages, each with a worked solution that does one
operation per step (the arithmetic task's step format), e.g.

    Mia buys 4 packs of 12 pencils. She gives away 7 pencils. How many pencils does she have left?
    <think>4*12=48. 48-7=41.</think><answer>41</answer>

Difficulty (1..5) sets the templates and the number ranges:

    level  templates                                            numbers
      1    packs, sharing (a fraction answer such as 7/3)        small (<= 12)
      2    + two-speed trip, fraction of a class                 <= 20
      3    + discount percentage, wages minus spending           <= 50
      4-5  all, larger numbers                                   <= 100 / <= 200

A flawed solution gets one step wrong (off by 1, 2 or 10) and carries the wrong value on to the answer.

Checking: `math_verify.verify(parse(gold), parse(answer))` in that order (verify is not symmetric), so
`41`, `41.0`, `\\boxed{41}`, `$41$` are all right, and `7/3`, `\\frac{7}{3}` are right for 7/3. math-verify's own
timeouts use signals, which only work in the main thread, so they are disabled (`parsing_timeout=None`,
`timeout_seconds=None`) and every check is bounded from outside instead: it runs in a warm worker process in
the sandbox (math-verify parses with sympy, which evaluates text), with a per-check deadline; a worker that
misses it is killed and restarted, and the check scores wrong. Answers are first limited to a small alphabet
(digits, letters, `+-*/^.,()$%{}\\` and spaces: no underscores or quotes).
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from nanoseek import sandbox
from nanoseek.config import ConfigError
from nanoseek.tasks.base import BatchCheckedTask, Problem, format_completion

SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)
CHECK_WALL_S = 5.0
MATH_LIMITS = sandbox.Limits(wall_s=CHECK_WALL_S, cpu_s=3600, memory_mb=1536, nproc=64, fsize_mb=1,
                             output_bytes=1 << 16)
_ANSWER_CHARS = re.compile(r"[0-9A-Za-z .,+\-*/^()$%{}\\]*")
NAMES = [("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he")]
ITEMS = ["pencils", "apples", "stickers", "marbles", "cards"]
MAX_NUM = {1: 12, 2: 20, 3: 50, 4: 100, 5: 200}
TEMPLATES = {1: ("packs", "share"), 2: ("trip", "class"), 3: ("discount", "wages")}


@dataclass
class Step:
    a: Fraction
    op: str
    b: Fraction
    result: Fraction

    def text(self) -> str:
        return f"{fmt(self.a)}{self.op}{fmt(self.b)}={fmt(self.result)}."


def fmt(x: Fraction) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def run_steps(plan: list, slip: tuple[int, int] | None = None) -> list[Step]:
    """Execute a plan of (a, op, b) where a/b are numbers or ('r', i) = the result of step i."""
    steps: list[Step] = []
    for i, (a, op, b) in enumerate(plan):
        va = steps[a[1]].result if isinstance(a, (tuple, list)) else Fraction(a)
        vb = steps[b[1]].result if isinstance(b, (tuple, list)) else Fraction(b)
        r = apply(va, op, vb)
        if slip is not None and slip[0] == i:
            r += slip[1] if r.denominator == 1 else Fraction(slip[1] // abs(slip[1]), r.denominator)
        steps.append(Step(va, op, vb, r))
    return steps


def _template(kind: str, rng: random.Random, hi: int) -> tuple[str, list]:
    name, she = rng.choice(NAMES)
    R = lambda i: ("r", i)  # noqa: E731 -- the result of step i
    if kind == "packs":
        n, k = rng.randint(2, hi), rng.randint(2, hi)
        g = rng.randint(1, n * k - 1)
        item = rng.choice(ITEMS)
        return (f"{name} buys {n} packs of {k} {item}. {she.capitalize()} gives away {g} {item}. "
                f"How many {item} does {she} have left?", [(n, "*", k), (R(0), "-", g)])
    if kind == "share":
        m = rng.randint(2, min(hi, 12))
        n = rng.randint(1, hi)
        while n % m == 0:
            n = rng.randint(1, hi)
        return (f"{n} pizzas are shared equally among {m} friends. How many pizzas does each friend get?",
                [(n, "/", m)])
    if kind == "trip":
        v, t, u, s = (rng.randint(2, hi) for _ in range(4))
        return (f"A train travels at {v} km per hour for {t} hours, then at {u} km per hour for {s} hours. "
                f"How many kilometres does it travel in total?", [(v, "*", t), (u, "*", s), (R(0), "+", R(1))])
    if kind == "class":
        b = rng.randint(2, 6)
        a = rng.randint(1, b - 1)
        n = b * rng.randint(2, max(2, hi // 2))
        return (f"A class has {n} students. {a}/{b} of them walk to school and the rest take the bus. "
                f"How many students take the bus?", [(n, "/", b), (R(0), "*", a), (n, "-", R(1))])
    if kind == "discount":
        q = rng.choice([10, 20, 25, 30, 40, 50, 75])
        p = rng.randint(1, hi) * (100 // _gcd(q, 100))
        return (f"A jacket costs {p} dollars. It is sold at {q}% off. What is the sale price in dollars?",
                [(p, "*", q), (R(0), "/", 100), (p, "-", R(1))])
    if kind == "wages":
        w, h, d = rng.randint(2, hi), rng.randint(2, 8), rng.randint(2, 6)
        s = rng.randint(1, w * h * d - 1)
        return (f"{name} earns {w} dollars per hour and works {h} hours a day for {d} days. "
                f"{she.capitalize()} spends {s} dollars. How many dollars are left?",
                [(w, "*", h), (R(0), "*", d), (R(1), "-", s)])
    raise ValueError(kind)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# ---- math-verify workers ---------------------------------------------------------------------------
WORKER_SRC = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from math_verify import parse, verify
print("ready " + sys.argv[2], flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse(req["gold"], parsing_timeout=None)
        pred = parse(req["pred"], parsing_timeout=None)
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
    except Exception:
        ok = False
    print(("1 " if ok else "0 ") + req["id"], flush=True)
"""


# math-verify and what it imports (checked with sys.modules after a parse + verify)
MATH_PACKAGES = ("math_verify", "latex2sympy2_extended", "antlr4", "sympy", "mpmath")


def _site_dir() -> str:
    try:
        import math_verify  # noqa: F401
    except ImportError as e:
        raise ConfigError("the math task needs math-verify: pip install math-verify") from e
    return sandbox.readable_packages(*MATH_PACKAGES)


class MathWorker:
    def __init__(self):
        ready = secrets.token_hex(6)
        site = _site_dir()
        self.worker = sandbox.Worker([sandbox.sandbox_python(), "-I", "-S", "-c", WORKER_SRC,
                                      json.dumps([site]), ready], MATH_LIMITS, binds=(site,),
                                     startup=" ", startup_marker=f"ready {ready}".encode(), startup_wall_s=120.0)

    def check(self, gold: str, pred: str) -> bool:
        nonce = secrets.token_hex(8)
        line = json.dumps({"id": nonce, "gold": gold, "pred": pred}) + "\n"
        out = self.worker.request(line, f"{nonce}\n".encode(), CHECK_WALL_S)
        if out is None:
            return False
        last = out.decode("utf-8", "replace").strip().splitlines()[-1]
        return last == f"1 {nonce}"

    def close(self) -> None:
        self.worker.close()


class MathPool:
    def __init__(self, n: int | None = None):
        self.n = max(1, n or (os.cpu_count() or 1))
        self.workers = [MathWorker() for _ in range(self.n)]
        self.lock = threading.Lock()
        # long-lived threads: bwrap's --die-with-parent fires when the *thread* that started a worker exits
        self.executor = ThreadPoolExecutor(self.n, thread_name_prefix="nanoseek-verify")

    def check(self, pairs: list[tuple[str, str]]) -> list[bool]:
        chunks = [list(range(k, len(pairs), self.n)) for k in range(self.n)]
        out = [False] * len(pairs)

        def run(wc):
            w, idx = wc
            for i in idx:
                out[i] = w.check(*pairs[i])
        with self.lock:
            list(self.executor.map(run, zip(self.workers, chunks)))
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()


_pool: MathPool | None = None
_pool_lock = threading.Lock()


def default_pool() -> MathPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = MathPool()
        return _pool


class MathWordTask(BatchCheckedTask):
    name = "math"
    sandboxed = True

    def __init__(self, weights=None, pool: MathPool | None = None):
        super().__init__(weights)
        self._pool = pool

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        kinds = [k for lv, ks in TEMPLATES.items() if lv <= d for k in ks]
        prompt, plan = _template(rng.choice(kinds), rng, MAX_NUM[d])
        answer = fmt(run_steps(plan)[-1].result)
        return Problem(prompt=prompt, answer=answer, meta={"task": self.name, "plan": plan, "difficulty": d})

    def check_batch(self, problems: list[Problem], answers: list[str]) -> list[bool]:
        ok = [False] * len(answers)
        todo = [i for i, a in enumerate(answers) if _ANSWER_CHARS.fullmatch(a) and a.strip()]
        if todo:
            res = (self._pool or default_pool()).check([(problems[i].answer, answers[i]) for i in todo])
            for i, v in zip(todo, res):
                ok[i] = v
        return ok

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        plan = problem.meta["plan"]
        steps = run_steps(plan)
        if flawed:
            for _ in range(20):
                try:
                    cand = run_steps(plan, (rng.randrange(len(plan)), rng.choice(SLIP_DELTAS)))
                except ZeroDivisionError:
                    continue
                if cand[-1].result != steps[-1].result:
                    steps = cand
                    break
        return format_completion(" ".join(s.text() for s in steps), fmt(steps[-1].result))
