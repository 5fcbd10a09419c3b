"""The one module that touches llama-cpp-python's internals.

`llama_cpp.Llama` keeps its own record of what the context holds (`input_ids`, `n_tokens`) and
matches every new prompt against it; the cache manager edits the context under it (cuts it back,
moves a chunk, restores a copy), so that record has to be told. Everything else in engram-llama
goes through this facade, so a change of llama-cpp-python's private layout is mended here alone.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from . import llama_cpp
from .lowlevel import control_strings, quiet_logs, token_piece, tokenize_plain


@contextlib.contextmanager
def eval_callback(cb):
    """Contexts made inside the block report every graph tensor to cb (a ggml eval callback):
    llama_cpp.Llama builds its context parameters itself, so its default is wrapped meanwhile."""
    if cb is None:
        yield
        return
    import llama_cpp.llama_cpp as low

    orig = low.llama_context_default_params

    def params():
        p = orig()
        p.cb_eval = cb
        return p

    low.llama_context_default_params = params
    try:
        yield
    finally:
        low.llama_context_default_params = orig


class LlamaAdapter:
    """A loaded model and its context, through llama_cpp.Llama."""

    def __init__(self, model_path: str, n_ctx: int, n_threads: int | None = None, n_gpu_layers: int = 0,
                 seed: int = 0, verbose: bool = False, cb_eval=None, flash_attn: bool = False):
        quiet_logs()
        self.n_threads = n_threads or os.cpu_count() or 1
        with eval_callback(cb_eval):
            self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=self.n_threads,
                                        n_gpu_layers=n_gpu_layers, seed=seed, verbose=verbose, flash_attn=flash_attn)
        llm = self._llm
        # llama.cpp may round the context up; llama-cpp-python sizes its buffers by the request
        self.n_ctx = min(llm.n_ctx(), n_ctx)
        self.n_batch = llm.n_batch
        self.n_vocab = llm.n_vocab()
        self.n_ctx_train = llm._model.n_ctx_train()
        self.metadata = dict(llm.metadata)
        self.bos_id, self.eos_id = llm.token_bos(), llm.token_eos()
        self.bos = llm._model.token_get_text(self.bos_id) if self.bos_id >= 0 else ""
        self.eos = llm._model.token_get_text(self.eos_id) if self.eos_id >= 0 else ""
        self._add_bos = self.bos_id >= 0 and llm._model.add_bos_token()
        self.finish_reason: str | None = None  # the last completion's: "stop" or "length"
        self._controls = None  # control_strings(), built on first need

    # pointers for the C side (the hook, the cache manager) --------------------------------------

    @property
    def ctx(self):
        return self._llm.ctx

    @property
    def model(self):
        return self._llm.model

    @property
    def memory(self):
        return llama_cpp.llama_get_memory(self._llm.ctx)

    def can_shift(self) -> bool:
        """llama.cpp can shift this cache's positions (not multi-dimensional positions)."""
        return bool(llama_cpp.llama_memory_can_shift(self.memory))

    # text -------------------------------------------------------------------------------------

    def tokenize(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[bytes], int]:
        """Token ids, each token's exact bytes, and how many tokens (BOS) come before the text;
        control-token strings inside the `plain` char spans stay text (tokenize_plain)."""
        add_bos = self._add_bos and not (self.bos and text.startswith(self.bos))
        vocab = self._llm._model.vocab
        if plain and self._controls is None:
            self._controls = control_strings(vocab) or False
        toks = tokenize_plain(vocab, text, add_bos, plain, self._controls or None)
        n_prefix = 1 if add_bos and toks and toks[0] == self.bos_id else 0
        return toks, [token_piece(vocab, t) for t in toks], n_prefix

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", "ignore")

    # what the context holds, as llama-cpp-python records it ------------------------------------

    @property
    def n_cached(self) -> int:
        return self._llm.n_tokens

    def cached(self) -> list[int]:
        return [int(t) for t in self._llm.input_ids[:self._llm.n_tokens]]

    def cut(self, p: int) -> bool:
        """Keep the first p cached tokens; False (nothing changed) where the memory cannot."""
        if p <= 0 or not self._llm._ctx.kv_cache_seq_rm(-1, p, -1):
            return False
        self._llm.n_tokens = p
        return True

    def clear(self) -> None:
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()

    def record(self, tokens: Sequence[int]) -> None:
        """The context holds these tokens (after the cache was edited under llama-cpp-python)."""
        n = len(tokens)
        self._llm.input_ids[:n] = tokens
        self._llm.n_tokens = n

    def eval(self, ids: Sequence[int]) -> None:
        """Decode ids after the cached tokens (in batches of n_batch)."""
        self._llm.eval(list(ids))

    def eval_at(self, ids: Sequence[int], pos0: int) -> None:
        """Decode ids from position pos0: what came after pos0 in the record is forgotten."""
        self._llm.n_tokens = pos0
        self._llm.eval(list(ids))

    def logits(self) -> np.ndarray:
        """The last decoded token's logits."""
        ptr = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def complete(self, tokens: Sequence[int], max_tokens: int, temperature: float,
                 stop: list[str], before_sample: Callable[[int], None] | None = None) -> Iterator[str]:
        """Text pieces of a completion of tokens; the cached prefix is reused by llama-cpp-python.
        before_sample(k): called with the count of answer tokens decoded so far (0: the prompt's
        last) each time new logits are ready, before the next token is drawn from them."""
        self.finish_reason = None
        procs = None
        if before_sample:
            calls = itertools.count()

            def _seen(input_ids, scores):
                before_sample(next(calls))
                return scores
            procs = llama_cpp.LogitsProcessorList([_seen])
        for part in self._llm.create_completion(prompt=list(tokens), max_tokens=max_tokens, temperature=temperature,
                                                top_k=1 if temperature == 0 else 40, stream=True, stop=stop,
                                                logits_processor=procs):
            choice = part["choices"][0]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]  # "stop" or "length"
            yield choice["text"]

    def close(self) -> None:
        self._llm.close()
