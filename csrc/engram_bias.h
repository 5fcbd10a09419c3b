// engram-llama: additive attention bias for llama.cpp
//
// A caller-supplied bias b[p] over the key positions p of a sequence is added to the attention
// scores of chosen softmax layers, after Q*K^T has been scaled and before the softmax:
//
//     A = softmax(scale_kq * Q*K^T + mask + layer_scale[il] * b[pos(k)])
//
// for every query of that sequence whose position is >= the sequence's gate position.
// The bias is folded into the KQ mask of the biased layers, so it works with flash attention on
// and off and on every backend (it is data, not a kernel). With no bias set, the graph is exactly
// the unpatched one.
//
// All functions return LLAMA_ENGRAM_OK (0) or a negative llama_engram_status; the reason is
// available from llama_engram_last_error() (per thread, valid until the next call).

#ifndef ENGRAM_BIAS_H
#define ENGRAM_BIAS_H

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMA_ENGRAM_API_VERSION 1

// gate position that applies the bias to every query (documents included)
#define LLAMA_ENGRAM_GATE_ALL 0

enum llama_engram_status {
    LLAMA_ENGRAM_OK              =  0,
    LLAMA_ENGRAM_ERR_NULL        = -1, // a required pointer is NULL
    LLAMA_ENGRAM_ERR_LAYER       = -2, // layer index out of range
    LLAMA_ENGRAM_ERR_NO_SOFTMAX  = -3, // the layer has no softmax attention of its own (recurrent, shared KV)
    LLAMA_ENGRAM_ERR_VALUE       = -4, // a value is NaN or infinite, or a length/position is negative
    LLAMA_ENGRAM_ERR_LENGTH      = -5, // bias longer than a sequence's context (llama_n_ctx_seq)
    LLAMA_ENGRAM_ERR_SEQ         = -6, // sequence id outside [0, n_seq_max)
    LLAMA_ENGRAM_ERR_UNSUPPORTED = -7, // the context's memory type cannot take a bias
    LLAMA_ENGRAM_ERR_ALLOC       = -8, // out of memory
};

enum llama_engram_layer_kind {
    LLAMA_ENGRAM_LAYER_INVALID = -1, // no such layer
    LLAMA_ENGRAM_LAYER_NONE    =  0, // no softmax attention here (e.g. Gated DeltaNet, Mamba): cannot be biased
    LLAMA_ENGRAM_LAYER_FULL    =  1, // full (global) softmax attention
    LLAMA_ENGRAM_LAYER_SWA     =  2, // sliding-window softmax attention
};

// LLAMA_ENGRAM_API_VERSION of the library; also how a loader recognises a patched libllama
LLAMA_API int32_t llama_engram_version(void);

// last error message of the calling thread ("" if the last call succeeded)
LLAMA_API const char * llama_engram_last_error(void);

// what kind of attention layer il of the model has (enum llama_engram_layer_kind)
LLAMA_API int32_t llama_engram_layer_kind(const struct llama_model * model, int32_t il);

// set the strength of the bias at layer il; 0 turns the layer off
// refused: il out of range (ERR_LAYER), no softmax attention (ERR_NO_SOFTMAX), non-finite (ERR_VALUE)
LLAMA_API int32_t llama_engram_set_layer(struct llama_context * ctx, int32_t il, float scale);

// strength at layer il (0 when off)
LLAMA_API int32_t llama_engram_get_layer(const struct llama_context * ctx, int32_t il, float * scale);

// turn every layer off
LLAMA_API int32_t llama_engram_clear_layers(struct llama_context * ctx);

// set the bias of a sequence: bias[p] is added at key position p (positions >= n_bias get 0),
// times the layer's strength, that product held to +-65504 (F16's largest: flash attention's mask);
// it applies to the queries at positions >= gate_pos (LLAMA_ENGRAM_GATE_ALL: every query).
// The values are copied. n_bias may be 0 (no bias). Refused: NULL bias with n_bias > 0,
// non-finite values, n_bias > llama_n_ctx_seq(), seq_id outside [0, n_seq_max), gate_pos < 0.
LLAMA_API int32_t llama_engram_set_seq(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                 const float * bias,
                     int32_t   n_bias,
                   llama_pos   gate_pos);

// remove the bias of one sequence, or of every sequence when seq_id < 0
LLAMA_API int32_t llama_engram_clear_seq(struct llama_context * ctx, llama_seq_id seq_id);

// 1 when a bias will be applied at the next decode (a layer is on and a sequence has a bias), else 0
LLAMA_API int32_t llama_engram_is_active(const struct llama_context * ctx);

// bytes held for biases by this context (O(n_ctx) per biased sequence)
LLAMA_API size_t llama_engram_mem_size(const struct llama_context * ctx);

#ifdef __cplusplus
}
#endif

#endif // ENGRAM_BIAS_H
