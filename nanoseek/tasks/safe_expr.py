"""A safe parser and evaluator for model-written arithmetic expressions (the Countdown checker).

Model output is untrusted text, so it is never handed to `eval`, `ast.literal_eval` or `compile`. Instead a
tokenizer plus a recursive-descent parser accept only this grammar (ASCII only, spaces allowed):

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := INT | '(' expr ')'

Deliberate limits, each one closing a way for hostile text to cost time or memory:
- input at most `MAX_CHARS` (200) characters and parentheses nested at most `MAX_DEPTH` (20) deep;
- integer literals of at most `MAX_DIGITS` (12) digits; no exponent operator, so values stay small;
- no unary minus: Countdown works with the given positive numbers, and `-` only ever means subtraction.
  (`a-b` already covers every use of a negative number, and forbidding `--3` keeps the grammar tiny.)
- arithmetic is exact (`fractions.Fraction`); division by zero makes the expression invalid.

`evaluate` raises `ExprError` (a ValueError) on anything outside the grammar; `try_evaluate` returns None.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 20
MAX_DIGITS = 12
OPERATORS = "+-*/"


class ExprError(ValueError):
    """The text is not a valid, bounded arithmetic expression."""


@dataclass(frozen=True)
class ExprResult:
    value: Fraction
    numbers: list[int]  # every integer literal, in order of appearance


def _tokenize(text: str) -> list[str]:
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression longer than {MAX_CHARS} characters")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t":
            i += 1
        elif "0" <= c <= "9":  # ASCII digits only: str.isdigit() would accept '²' and '٣'
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_DIGITS:
                raise ExprError(f"number with more than {MAX_DIGITS} digits")
            tokens.append(text[i:j])
            i = j
        elif c in OPERATORS or c in "()":
            tokens.append(c)
            i += 1
        else:
            raise ExprError(f"character {c!r} is not allowed")
    if not tokens:
        raise ExprError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExprError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ExprError("division by zero")
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.take()
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExprError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExprError("missing ')'")
            return value
        if tok.isdigit():
            n = int(tok)
            self.numbers.append(n)
            return Fraction(n)
        raise ExprError(f"unexpected {tok!r}")


def evaluate(text: str) -> ExprResult:
    """Parse and evaluate `text` exactly; raise ExprError if it is not a valid bounded expression."""
    if not isinstance(text, str):
        raise ExprError("expression must be a string")
    parser = _Parser(_tokenize(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExprError(f"unexpected {parser.peek()!r} after the expression")
    return ExprResult(value, parser.numbers)


def try_evaluate(text: str) -> ExprResult | None:
    """`evaluate`, but None instead of an exception: the reward path must never raise."""
    try:
        return evaluate(text)
    except ExprError:
        return None
