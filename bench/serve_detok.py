"""Per-token cost of the server's text side (tokens -> text deltas + stop strings): this checkout's
incremental ChoiceStream against the one at commit c43e4b6, which re-decoded a field's whole text and
re-scanned every stop string at each token (quadratic). Both run in this process on the same tokens; medians
of 3 rounds. The old module comes from `git show c43e4b6:nanoseek/engine/protocol.py` (or --old FILE).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.corpus import corpus_texts  # noqa: E402
from nanoseek.engine import protocol as new  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def load_old(path: str | None):
    if path is None:
        src = subprocess.run(["git", "show", "c43e4b6:nanoseek/engine/protocol.py"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout
        f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        f.write(src)
        f.close()
        path = f.name
    spec = importlib.util.spec_from_file_location("old_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_protocol"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="the old protocol.py (default: from git at c43e4b6)")
    args = ap.parse_args()
    old = load_old(args.old)
    tok = Tokenizer.train(corpus_texts("arithmetic", 300, seed=0), vocab_size=512)
    long_stops = [c * 1000 for c in "zyx9"]
    for n_tok, stops in [(1000, []), (2000, []), (500, long_stops), (1000, long_stops)]:
        ids = tok.encode("12 + 34 = 46. " * 400)[:n_tok]
        row = []
        for mod in (old, new):
            ts = []
            for _ in range(3):
                s = mod.ChoiceStream(tok, chat=False, stop=stops)
                t = time.perf_counter()
                for k, i in enumerate(ids):
                    s.feed(i, "length" if k == len(ids) - 1 else None)
                ts.append(time.perf_counter() - t)
            row.append(statistics.median(ts))
        what = f"{len(stops)} stops x {len(stops[0])} chars" if stops else "no stops"
        print(f"{n_tok:>5} tokens, {what:<20} c43e4b6 {row[0] / n_tok * 1e6:>7.0f} us/token   "
              f"now {row[1] / n_tok * 1e6:>5.1f} us/token   {row[0] / row[1]:>5.0f}x")


if __name__ == "__main__":
    main()
