"""Tiny random-weight GGUF models, made by the patched llama.cpp itself.

The hook has to be proven on the real graphs (the qwen35 hybrid, Gemma 3's sliding/global mix,
a Llama-style dense model) without downloading them: llama.cpp can build any architecture from
GGUF metadata plus a callback that fills the tensors (llama_model_init_from_user, the path its
tests/test-llama-archs.cpp uses) and save the result. Sizes are parameters, so the same code makes
the few-MB test models and a Qwen3.5-2B-shaped one for benchmarks.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engram_llama.profile import cache_dir


@dataclass
class Shape:
    arch: str
    n_layer: int
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_vocab: int = 256
    n_ctx: int = 4096
    # qwen35: every full_attention_interval-th layer is softmax attention, the rest Gated DeltaNet
    full_attention_interval: int = 4
    ssm_inner: int = 64
    ssm_state: int = 16
    ssm_groups: int = 2
    ssm_dt_rank: int = 4
    # gemma3: n_swa-token sliding window, every swa_pattern-th layer global
    n_swa: int = 16
    swa_pattern: int = 3
    extra: dict = field(default_factory=dict)
    # a real tokenizer ("smollm2": SmolLM2's BPE vocabulary, with <|im_start|>/<|im_end|>) and a
    # chat template file (repository-relative), for end-to-end runs on text; default: a toy vocabulary
    tokenizer: str | None = None
    chat_template: str | None = None


# the shapes the tests use; "qwen35-2b" is the target model's shape for GPU benchmarks
SHAPES = {
    "qwen35": Shape("qwen35", n_layer=8),
    "gemma3": Shape("gemma3", n_layer=6),
    "llama": Shape("llama", n_layer=4),
    # the hybrid with SmolLM2's vocabulary and the real Qwen3.5-4B/9B/27B chat template (thinking on
    # unless enable_thinking is false): `engram-llama run` end to end on a Qwen3.5-style GGUF
    # a dense model with a real vocabulary: `ask` end to end (calibrate) without SmolLM2's weights
    "llama-smol": Shape("llama", n_layer=4, tokenizer="smollm2"),
    "qwen35-chat": Shape("qwen35", n_layer=4, tokenizer="smollm2",
                         chat_template="tests/data/qwen35_4b_chat_template.jinja"),
    "qwen35-2b": Shape("qwen35", n_layer=24, n_embd=2048, n_head=8, n_head_kv=2, n_ff=6144,
                       n_vocab=248320, n_ctx=32768, ssm_inner=2048, ssm_state=128, ssm_groups=16,
                       ssm_dt_rank=16),
}


ROOT = Path(__file__).resolve().parent.parent


def _tokenizer_source(name: str) -> Path:
    if name != "smollm2":
        return Path(name)
    from engram_llama.cli import default_model

    return Path(default_model())


def _copy_tokenizer(w, src: Path) -> None:
    """Every tokenizer.* key of src but its chat template."""
    import gguf

    r = gguf.GGUFReader(str(src))
    for k, f in r.fields.items():
        if not k.startswith("tokenizer.") or k == "tokenizer.chat_template":
            continue
        t = f.types[0]
        sub = f.types[1] if t == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), t, sub)


def _n_vocab(shape: Shape) -> int:
    if not shape.tokenizer:
        return shape.n_vocab
    import gguf

    return len(gguf.GGUFReader(str(_tokenizer_source(shape.tokenizer))).fields["tokenizer.ggml.tokens"].data)


def _metadata(shape: Shape, path: Path) -> None:
    import gguf

    a = shape.arch
    w = gguf.GGUFWriter(str(path), a)
    u32 = w.add_uint32
    u32(f"{a}.context_length", shape.n_ctx)
    u32(f"{a}.embedding_length", shape.n_embd)
    u32(f"{a}.block_count", shape.n_layer)
    u32(f"{a}.feed_forward_length", shape.n_ff)
    u32(f"{a}.attention.head_count", shape.n_head)
    u32(f"{a}.attention.head_count_kv", shape.n_head_kv)
    u32(f"{a}.vocab_size", _n_vocab(shape))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    head = shape.n_embd // shape.n_head
    if a == "qwen35":
        # interleaved M-RoPE sections as llama.cpp's own test fixture sets them
        w.add_array(f"{a}.rope.dimension_sections", [head // 4] * 4)
        u32(f"{a}.ssm.conv_kernel", 4)
        u32(f"{a}.ssm.inner_size", shape.ssm_inner)
        u32(f"{a}.ssm.state_size", shape.ssm_state)
        u32(f"{a}.ssm.time_step_rank", shape.ssm_dt_rank)
        u32(f"{a}.ssm.group_count", shape.ssm_groups)
        u32(f"{a}.full_attention_interval", shape.full_attention_interval)
    elif a == "gemma3":
        u32(f"{a}.attention.key_length", head)
        u32(f"{a}.attention.value_length", head)
        u32(f"{a}.attention.sliding_window", shape.n_swa)
        u32(f"{a}.attention.sliding_window_pattern", shape.swa_pattern)
        w.add_float32(f"{a}.rope.freq_base_swa", 10000.0)
    for k, v in shape.extra.items():
        if isinstance(v, float):
            w.add_float32(f"{a}.{k}", v)
        else:
            u32(f"{a}.{k}", int(v))
    if shape.tokenizer:
        _copy_tokenizer(w, _tokenizer_source(shape.tokenizer))
    else:
        w.add_string("tokenizer.ggml.model", "test")
        w.add_array("tokenizer.ggml.tokens", [f"tok_{i}" for i in range(shape.n_vocab)])
        w.add_array("tokenizer.ggml.scores", [0.0] * shape.n_vocab)
    if shape.chat_template:
        w.add_string("tokenizer.chat_template", (ROOT / shape.chat_template).read_text(encoding="utf-8"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_model(shape: Shape | str, path: str | os.PathLike, seed: int = 42, stdev: float = 0.1) -> Path:
    """Write a random-weight GGUF of the given shape (F32 weights) to path."""
    from engram_llama import llama_cpp  # the patched libllama

    from engram_llama.lowlevel import GGUFInitParams, ggml_base

    if isinstance(shape, str):
        shape = SHAPES[shape]
    path = Path(path)
    ggml = ggml_base()

    errors: list[BaseException] = []

    def fill(tensor, _ud):
        try:
            name = ggml.ggml_get_name(tensor).decode()
            n = ggml.ggml_nelements(tensor)
            nbytes = ggml.ggml_nbytes(tensor)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            vals = rng.normal(0.0, stdev, n).astype(np.float32)
            if "ssm_a" in name:
                vals = -np.abs(vals)  # state decay must be negative
            if nbytes == 2 * n:
                data = vals.astype(np.float16)
            elif nbytes == 4 * n:
                data = vals
            else:
                raise ValueError(f"tensor {name}: unexpected type ({nbytes} bytes for {n} elements)")
            ggml.ggml_backend_tensor_set(tensor, data.ctypes.data, 0, nbytes)
        except BaseException as e:  # never let an exception cross into C
            errors.append(e)

    cb = llama_cpp.llama_model_set_tensor_data_t(fill)

    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / "meta.gguf"
        _metadata(shape, meta_path)
        meta = ggml.gguf_init_from_file(str(meta_path).encode(), GGUFInitParams(True, None))
        if not meta:
            raise RuntimeError(f"could not read the generated metadata {meta_path}")
        try:
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = 0
            model = llama_cpp.llama_model_init_from_user(ctypes.c_void_p(meta), cb, None, mparams)
            if not model:
                raise RuntimeError(f"llama.cpp could not build a {shape.arch} model from {shape}")
            try:
                if errors:
                    raise errors[0]
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp_out = path.with_name(path.name + ".tmp")
                llama_cpp.llama_model_save_to_file(model, str(tmp_out).encode())
                if shape.chat_template:  # llama.cpp's writer leaves the chat template out
                    _add_chat_template(tmp_out, (ROOT / shape.chat_template).read_text(encoding="utf-8"))
                os.replace(tmp_out, path)
            finally:
                llama_cpp.llama_model_free(model)
        finally:
            ggml.gguf_free(meta)
    return path


def _add_chat_template(path: Path, template: str) -> None:
    """Rewrite a GGUF with tokenizer.chat_template (as gguf's gguf_new_metadata copies a file)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = path.with_name(path.name + ".t")
    w = gguf.GGUFWriter(str(out), arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        t, v = f.types[0], f.contents()
        if t == gguf.GGUFValueType.ARRAY and not v:
            continue  # gguf's writer refuses an empty array (llama.cpp wrote an empty token score list)
        w.add_key_value(f.name, v, t, sub_type=f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
    w.add_chat_template(template)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data, tensor_endianess=r.endianess)
    w.close()
    del r
    os.replace(out, path)


QUANTS = {"q8_0": 7, "f16": 1}  # llama_ftype values of the types benchmarks use


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str) -> Path:
    """Re-encode a GGUF (q8_0 is what the speed figures of the target model are quoted at)."""
    from engram_llama import llama_cpp

    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    tmp_out = dst.with_name(dst.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"could not quantize {src} to {quant}")
    os.replace(tmp_out, dst)
    return dst


def cached_model(name: str, cache: str | os.PathLike | None = None, seed: int = 42, quant: str | None = None) -> Path:
    """A test model by SHAPES name, generated once into the cache directory (quant: see QUANTS)."""
    root = (Path(cache) if cache else cache_dir()) / "models"
    shape = SHAPES[name]
    template = (ROOT / shape.chat_template).read_text(encoding="utf-8") if shape.chat_template else ""
    tag = zlib.crc32(repr((shape, seed, template)).encode())
    path = root / f"synth-{name}-{tag:08x}.gguf"
    if not path.exists():
        make_model(shape, path, seed=seed)
    if quant is None:
        return path
    qpath = path.with_name(f"{path.stem}-{quant}.gguf")
    if not qpath.exists():
        quantize(path, qpath, quant)
    return qpath
