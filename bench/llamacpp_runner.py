"""llama.cpp through its C API (llama_batch / llama_decode), for the GGUF checks and bench/vs_llamacpp.py.

Two Python bindings expose the same C functions and either is used: `llama_cpp` (llama-cpp-python, ctypes; `make
llamacpp` builds it from source) or `llama_cpp_py_sync` (CFFI over a prebuilt libllama, a wheel on PyPI: `pip
install llama-cpp-py-sync`). Only the handful of binding-specific bits (arrays, pointers, the log callback) differ;
they are in `_Binding`. The high-level wrappers of both are skipped: they sample inside llama.cpp and hide the
batch, and the checks need raw logits and several sequences per batch (llama.cpp's parallel decoding).

`LlamaCpp(path, n_threads, n_seq, n_ctx_seq, exact)`: one model and one context with `n_seq` sequences of up to
`n_ctx_seq` tokens each (a KV stream per sequence, kv_unified off). `exact` (the checks) runs f32 end to end: an
f32 KV cache and no flash attention; exact=False keeps llama.cpp's defaults (f16 cache, flash attention auto),
what its users run and what bench/vs_llamacpp.py times. `prefill(prompts)` puts every prompt in one
batch (chunked by n_batch) and returns each one's last-token logits; `step(tokens)` decodes one token per
sequence; `greedy(prompts, n)` is both; `tokenize(text)` parses special tokens as nanoseek's tokenizer does.
"""
from __future__ import annotations

import numpy as np


class _Binding:
    def __init__(self):
        try:
            import llama_cpp as lc

            self.name, self.lib, self.ffi = "llama-cpp-python", lc, None
        except ImportError:
            from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

            self.name, self.lib, self.ffi = "llama-cpp-py-sync", get_lib(), get_ffi()
        self._quiet()

    def _quiet(self) -> None:
        """Drop llama.cpp's log lines (the callback object is kept alive on self)."""
        if self.ffi is None:
            import ctypes

            self._log_cb = self.lib.llama_log_callback(lambda level, text, data: None)
            self.lib.llama_log_set(self._log_cb, ctypes.c_void_p())
        else:
            self._log_cb = self.ffi.callback("void(enum ggml_log_level, const char *, void *)",
                                             lambda level, text, data: None)
            self.lib.llama_log_set(self._log_cb, self.ffi.NULL)

    def floats(self, ptr, n: int) -> np.ndarray:
        if self.ffi is None:
            return np.ctypeslib.as_array(ptr, shape=(n,))
        return np.frombuffer(self.ffi.buffer(ptr, 4 * n), dtype=np.float32)

    def tokens(self, n: int):
        if self.ffi is None:
            return (self.lib.llama_token * n)()
        return self.ffi.new("llama_token[]", n)

    def is_null(self, p) -> bool:
        return (not p) if self.ffi is None else p == self.ffi.NULL


class LlamaCpp:
    def __init__(self, path: str, n_threads: int = 2, n_seq: int = 1, n_ctx_seq: int = 256, n_batch: int = 512,
                 exact: bool = True):
        b = self.b = _Binding()
        lib = b.lib
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if b.is_null(self.model):
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.kv_unified = False
        if exact:  # llama.cpp's defaults: an f16 KV cache and (auto) flash attention, whose CPU kernel rounds the
            cp.type_k = cp.type_v = 0  # query to f16 (logits ~6e-5 of their range off); GGML_TYPE_F32
            cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: f32 end to end (~2e-7 of the range)
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if b.is_null(self.ctx):
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_seq, self.n_batch = n_seq, n_batch
        self.batch = lib.llama_batch_init(n_batch, 0, n_seq)
        self.pos = [0] * n_seq

    def close(self) -> None:
        lib = self.b.lib
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)

    def reset(self) -> None:
        self.b.lib.llama_memory_clear(self.b.lib.llama_get_memory(self.ctx), True)
        self.pos = [0] * self.n_seq

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = self.b.tokens(len(raw) + 8)
        n = self.b.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(raw) + 8, False, True)
        if n < 0:
            raise RuntimeError("llama_tokenize failed")
        return [int(buf[i]) for i in range(n)]

    def _decode(self, items: list[tuple[int, int, bool]]) -> list[np.ndarray]:
        """items: (seq, token, want_logits) in order; positions continue each sequence. Logits of the flagged."""
        out = []
        for start in range(0, len(items), self.n_batch):
            chunk, b = items[start:start + self.n_batch], self.batch
            for i, (seq, tok, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, self.pos[seq], 1, want
                b.seq_id[i][0] = seq
                self.pos[seq] += 1
            b.n_tokens = len(chunk)
            rc = self.b.lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            out += [self.b.floats(self.b.lib.llama_get_logits_ith(self.ctx, i), self.n_vocab).copy()
                    for i, (_, _, want) in enumerate(chunk) if want]
        return out

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """(len(prompts), n_vocab) last-position logits; prompt i is sequence i."""
        items = [(s, t, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        return np.stack(self._decode(items))

    def all_logits(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """(len(seq), n_vocab) logits at every position of each sequence (teacher forcing), from a fresh cache."""
        self.reset()
        flat = self._decode([(s, t, True) for s, q in enumerate(seqs) for t in q])
        out, i = [], 0
        for q in seqs:
            out.append(np.stack(flat[i:i + len(q)]))
            i += len(q)
        return out

    def step(self, tokens: list[int]) -> np.ndarray:
        """One new token per sequence 0..len(tokens)-1 -> (len(tokens), n_vocab) logits."""
        return np.stack(self._decode([(s, t, True) for s, t in enumerate(tokens)]))

    def greedy(self, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], np.ndarray]:
        """n_new greedy tokens per prompt (no eos stop) and the first new token's logits."""
        self.reset()
        logits = first = self.prefill(prompts)
        out = [[] for _ in prompts]
        for k in range(n_new):
            nxt = logits.argmax(-1).tolist()
            for o, t in zip(out, nxt):
                o.append(t)
            if k < n_new - 1:
                logits = self.step(nxt)
        return out, first
