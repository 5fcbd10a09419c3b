"""The move (engram_llama.move): a chunk's cached cells shifted to the end of the documents.

Only the low-level API here, so that it also runs where the hook's tests run on a GPU machine
(no spaCy there)."""
import numpy as np

from conftest import N_GPU_LAYERS
from engram_llama import llama_cpp
from research import synth
from engram_llama.align import Prompt
from engram_llama.lowlevel import Context, Model
from engram_llama.move import moved_prompt, moved_tokens, reread_to_end, shift_to_end


def _ask(ctx, ids: list[int], q0: int) -> np.ndarray:
    """The last logits of the question ids[q0:] on the cached documents, then the question dropped."""
    out = ctx.decode_seq(ids[q0:], start=q0, all_logits=False)[-1]
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx.ptr), 0, q0, -1)
    return out


def test_shift_to_end_equals_a_reordered_prefill_on_one_layer(tmp_path):
    """On a one-layer model the cached keys and values of a token depend only on the token and its
    position, so moving a span's cells to the end (move.shift_to_end) must give the logits of
    a prefill of the reordered tokens; shifting back must give the unmoved logits again."""
    path = tmp_path / "llama1.gguf"
    # weights large enough that attention is far from uniform (the default 0.1 leaves it flat)
    synth.make_model(synth.Shape("llama", n_layer=1), path, seed=7, stdev=1.0)
    model = Model(path, n_gpu_layers=N_GPU_LAYERS)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, model.n_vocab, 40)]
    q0, a, b = 32, 4, 12
    with Context(model, n_ctx=128) as ctx:
        mem = llama_cpp.llama_get_memory(ctx.ptr)

        def ask() -> np.ndarray:
            return _ask(ctx, ids, q0)

        ctx.decode_seq(ids[:q0], all_logits=False)
        plain = ask()
        shift_to_end(llama_cpp, mem, a, b, q0)
        assert (llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)) == (0, q0 - 1)
        moved = ask()
        shift_to_end(llama_cpp, mem, a, b, q0, back=True)
        back = ask()
        ctx.clear_kv()
        ctx.decode_seq(ids[:a] + ids[b:q0] + ids[a:b], all_logits=False)
        reordered = ask()
    model.close()
    gap = np.abs(reordered - plain).max()
    assert gap > 1e-2  # the order matters to this model, so the comparisons below can fail
    # the shift re-rotates F16 keys: equal up to that rounding (measured 0.08% and 0.05% of the gap
    # on the CPU; on an H200, every layer on the GPU, 0.86% for the move); a key left unrotated or
    # rotated twice would be off by about the gap itself
    tol = 0.005 if N_GPU_LAYERS == 0 else 0.02
    print(f"move {np.abs(moved - reordered).max() / gap:.3%}, back {np.abs(back - plain).max() / gap:.3%} of the gap")
    assert np.abs(moved - reordered).max() < tol * gap
    assert np.abs(back - plain).max() < tol * gap
    # the chunk spans the runner biases after the move: [a, b) at the end, the rest moved up
    p = Prompt("", ids, [0, 1, 2], {}, {0: (0, 4), 1: (4, 12), 2: (12, 32)}, q0, [], 0)
    mp = moved_prompt(p, a, b)
    assert mp.chunk_tokens == {0: (0, 4), 1: (24, 32), 2: (4, 24)}
    assert [mp.tokens[x:y] for x, y in (mp.chunk_tokens[1], mp.chunk_tokens[2])] == [ids[4:12], ids[12:32]]
    assert moved_tokens(list(range(36)), a, b, q0) == list(range(4)) + list(range(12, 32)) + list(range(4, 12)) + [32, 33, 34, 35]


def test_reread_to_end_reads_the_chunk_where_reordering_would(tmp_path):
    """reread_to_end recomputes the moved chunk's cells at the documents' end. On one layer that is
    a reordered prefill with no re-rotation at all (tighter than the shift); on two layers, where a
    cell depends on the tokens before it, a chunk already last read again must leave every logit as
    it was (the cells removed and computed again at the same places, the same context)."""
    ids = None
    out = {}
    for n_layer in (1, 2):
        path = tmp_path / f"llama{n_layer}.gguf"
        synth.make_model(synth.Shape("llama", n_layer=n_layer), path, seed=7, stdev=1.0)
        model = Model(path, n_gpu_layers=N_GPU_LAYERS)
        ids = ids or [int(t) for t in np.random.default_rng(3).integers(0, model.n_vocab, 40)]
        q0 = 32
        with Context(model, n_ctx=128) as ctx:
            mem = llama_cpp.llama_get_memory(ctx.ptr)

            def ask() -> np.ndarray:
                return _ask(ctx, ids, q0)

            calls = []

            def decode(toks, pos0):
                calls.append((list(toks), pos0))
                ctx.decode_seq(toks, start=pos0, all_logits=False)

            def fresh(order):
                ctx.clear_kv()
                ctx.decode_seq(order, all_logits=False)

            fresh(ids[:q0])
            plain = ask()
            reread_to_end(llama_cpp, mem, decode, ids, 24, 32, q0)  # already last
            assert calls == [(list(ids[24:32]), 24)]  # read again in place, so equal logits below are not a no-op
            assert (llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)) == (0, q0 - 1)
            out[n_layer, "last"] = (plain, ask())
            if n_layer == 1:
                fresh(ids[:q0])
                reread_to_end(llama_cpp, mem, decode, ids, 4, 12, q0)
                reread = ask()
                fresh(ids[:4] + ids[12:q0] + ids[4:12])
                out[n_layer, "front"] = (plain, reread, ask())
        model.close()
    plain, reread, reordered = out[1, "front"]
    gap = np.abs(reordered - plain).max()
    assert gap > 1e-2
    # the same cells, the same positions: equal up to the batch's float order
    assert np.abs(reread - reordered).max() < 1e-3 * gap
    for n_layer in (1, 2):
        plain, again = out[n_layer, "last"]
        assert np.abs(again - plain).max() < 1e-3 * np.abs(plain).max()
