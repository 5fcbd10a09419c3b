"""The benchmark models: a generated model re-encoded to Q8_0 keeps its types and its outputs."""
import gguf
import numpy as np

from research import synth
from engram_llama.lowlevel import Context, Model

from conftest import tokens


def test_q8_0_copy_has_q8_0_matrices_and_close_logits(tmp_path):
    src = synth.cached_model("llama")
    dst = synth.quantize(src, tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(dst)).tensors}
    matrices = [n for n, t in types.items() if n.endswith("attn_q.weight") or n.endswith("ffn_up.weight")]
    assert matrices and all(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in matrices)
    assert all(t == gguf.GGMLQuantizationType.F32 for n, t in types.items() if n.endswith("norm.weight"))
    logits = []
    for path in (src, dst):
        m = Model(path)
        with Context(m, n_ctx=64) as c:
            logits.append(c.decode_seq(tokens(m, 24))[-1])
        m.close()
    f32, q8 = logits
    # 8-bit blocks: small relative error, same ranking at the top
    assert np.abs(q8 - f32).max() <= 0.05 * np.abs(f32).max()
    assert np.argmax(q8) == np.argmax(f32)
