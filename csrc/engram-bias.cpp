// engram-llama: state, validation and the C API (engram_bias.h)

#include "engram_bias.h"
#include "engram-graph.h"
#include "engram-state.h"
#include "engram-access.h"

#include "llama-context.h"
#include "llama-model.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

static thread_local std::string g_last_error;

static int32_t engram_ok() {
    g_last_error.clear();
    return LLAMA_ENGRAM_OK;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int32_t engram_fail(int32_t code, const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    return code;
}

llama_engram::llama_engram(llama_context * ctx)
    : ctx(ctx), model(*llama_get_model(ctx)), layer_scale(model.hparams.n_layer(), 0.0f) {}

void llama_engram::update_key() {
    bool any_layer = false;
    // FNV-1a over the layer strengths: the same set of biased layers and strengths gives the same
    // graph, so a graph built for it can be reused when only the bias values change
    uint64_t h = 1469598103934665603ull;
    for (size_t il = 0; il < layer_scale.size(); ++il) {
        uint32_t bits;
        std::memcpy(&bits, &layer_scale[il], sizeof(bits));
        if (layer_scale[il] != 0.0f) {
            any_layer = true;
        } else {
            bits = 0; // -0.0f and 0.0f are both off
        }
        for (int b = 0; b < 4; ++b) {
            h ^= (bits >> (8*b)) & 0xff;
            h *= 1099511628211ull;
        }
    }
    key = (any_layer && !seqs.empty()) ? (h | 1) : 0;

    // any change of topology, from or to none included, re-plans the context's worst-case graph
    // (as llama.cpp does for its own graph-changing settings): ggml-alloc sizes its buffers from
    // that plan, and a graph it does not cover is re-planned, and its buffers reallocated, on every
    // ubatch whose KV view has grown (each ubatch of a prefill)
    if (key != key_built) {
        llama_engram_access::request_reserve(ctx);
    }
}

uint64_t llama_engram_graph_key(const llama_engram * eg) {
    return eg ? eg->key : 0;
}

const llama_kv_cache_context * llama_engram_kv_ctx(const llama_memory_context_i * mctx, const llama_hparams & hparams, int il) {
    if (auto * c = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return c;
    }
    if (auto * c = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return hparams.is_swa(il) ? c->get_swa() : c->get_base();
    }
    if (auto * c = dynamic_cast<const llama_memory_hybrid_context *>(mctx)) {
        return c->get_attn();
    }
    if (auto * c = dynamic_cast<const llama_memory_hybrid_iswa_context *>(mctx)) {
        return hparams.is_swa(il) ? c->get_attn()->get_swa() : c->get_attn()->get_base();
    }
    return nullptr;
}

// the memory types whose contexts llama_engram_kv_ctx() knows
static bool engram_memory_supported(const llama_memory_i * mem) {
    return dynamic_cast<const llama_kv_cache *>(mem)              != nullptr ||
           dynamic_cast<const llama_kv_cache_iswa *>(mem)         != nullptr ||
           dynamic_cast<const llama_memory_hybrid *>(mem)         != nullptr ||
           dynamic_cast<const llama_memory_hybrid_iswa *>(mem)    != nullptr;
}

static llama_engram * engram_get(llama_context * ctx) {
    if (!ctx->engram) {
        ctx->engram = std::make_shared<llama_engram>(ctx);
    }
    return ctx->engram.get();
}

extern "C" {

int32_t llama_engram_version(void) {
    return LLAMA_ENGRAM_API_VERSION;
}

const char * llama_engram_last_error(void) {
    return g_last_error.c_str();
}

int32_t llama_engram_layer_kind(const llama_model * model, int32_t il) {
    if (model == nullptr) {
        engram_fail(LLAMA_ENGRAM_ERR_NULL, "model is NULL");
        return LLAMA_ENGRAM_LAYER_INVALID;
    }
    const auto & hp = model->hparams;
    if (il < 0 || (uint32_t) il >= hp.n_layer()) {
        engram_fail(LLAMA_ENGRAM_ERR_LAYER, "layer %d is out of range: the model has %u layers", il, hp.n_layer());
        return LLAMA_ENGRAM_LAYER_INVALID;
    }
    engram_ok();
    if (hp.is_recr(il) || hp.n_head(il) == 0 || !hp.has_kv(il)) {
        return LLAMA_ENGRAM_LAYER_NONE;
    }
    return hp.is_swa(il) ? LLAMA_ENGRAM_LAYER_SWA : LLAMA_ENGRAM_LAYER_FULL;
}

int32_t llama_engram_set_layer(llama_context * ctx, int32_t il, float scale) {
    if (ctx == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "context is NULL");
    }
    const llama_model * model = llama_get_model(ctx);
    const auto & hp = model->hparams;
    if (il < 0 || (uint32_t) il >= hp.n_layer()) {
        return engram_fail(LLAMA_ENGRAM_ERR_LAYER, "layer %d is out of range: the model (%s) has %u layers (0..%u)",
                il, llm_arch_name(model->arch), hp.n_layer(), hp.n_layer() - 1);
    }
    if (!std::isfinite(scale)) {
        return engram_fail(LLAMA_ENGRAM_ERR_VALUE, "layer %d: the strength must be finite", il);
    }
    if (hp.is_recr(il) || hp.n_head(il) == 0) {
        return engram_fail(LLAMA_ENGRAM_ERR_NO_SOFTMAX,
                "layer %d of %s has no softmax attention (it is a recurrent/linear-attention layer): it cannot take a bias",
                il, llm_arch_name(model->arch));
    }
    if (!hp.has_kv(il)) {
        return engram_fail(LLAMA_ENGRAM_ERR_NO_SOFTMAX,
                "layer %d of %s reuses the KV cache of another layer: it cannot take a bias",
                il, llm_arch_name(model->arch));
    }
    if (!engram_memory_supported(llama_get_memory(ctx))) {
        return engram_fail(LLAMA_ENGRAM_ERR_UNSUPPORTED,
                "the memory of this %s context (a KV cache type other than the standard, SWA and hybrid ones) cannot take a bias",
                llm_arch_name(model->arch));
    }
    llama_engram * eg;
    try {
        eg = engram_get(ctx);
    } catch (const std::bad_alloc &) {
        return engram_fail(LLAMA_ENGRAM_ERR_ALLOC, "out of memory");
    }
    eg->layer_scale[il] = scale;
    eg->update_key();
    return engram_ok();
}

int32_t llama_engram_get_layer(const llama_context * ctx, int32_t il, float * scale) {
    if (ctx == nullptr || scale == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "%s is NULL", ctx == nullptr ? "context" : "scale");
    }
    const auto & hp = llama_get_model(ctx)->hparams;
    if (il < 0 || (uint32_t) il >= hp.n_layer()) {
        return engram_fail(LLAMA_ENGRAM_ERR_LAYER, "layer %d is out of range: the model has %u layers", il, hp.n_layer());
    }
    *scale = ctx->engram ? ctx->engram->layer_scale[il] : 0.0f;
    return engram_ok();
}

int32_t llama_engram_clear_layers(llama_context * ctx) {
    if (ctx == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "context is NULL");
    }
    if (ctx->engram) {
        std::fill(ctx->engram->layer_scale.begin(), ctx->engram->layer_scale.end(), 0.0f);
        ctx->engram->update_key();
    }
    return engram_ok();
}

int32_t llama_engram_set_seq(llama_context * ctx, llama_seq_id seq_id, const float * bias, int32_t n_bias, llama_pos gate_pos) {
    if (ctx == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "context is NULL");
    }
    if (seq_id < 0 || (uint32_t) seq_id >= llama_n_seq_max(ctx)) {
        return engram_fail(LLAMA_ENGRAM_ERR_SEQ, "sequence %d is out of range: the context has %u sequences", seq_id, llama_n_seq_max(ctx));
    }
    if (n_bias < 0) {
        return engram_fail(LLAMA_ENGRAM_ERR_VALUE, "bias length %d is negative", n_bias);
    }
    if (n_bias > 0 && bias == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "bias is NULL but its length is %d", n_bias);
    }
    if ((uint32_t) n_bias > llama_n_ctx_seq(ctx)) {
        return engram_fail(LLAMA_ENGRAM_ERR_LENGTH, "bias of %d positions is longer than a sequence's context (%u)",
                n_bias, llama_n_ctx_seq(ctx));
    }
    if (gate_pos < 0) {
        return engram_fail(LLAMA_ENGRAM_ERR_VALUE, "gate position %d is negative", gate_pos);
    }
    for (int32_t i = 0; i < n_bias; ++i) {
        if (!std::isfinite(bias[i])) {
            return engram_fail(LLAMA_ENGRAM_ERR_VALUE, "bias[%d] is not finite (%f)", i, (double) bias[i]);
        }
    }
    try {
        std::vector<float> values(bias, bias + n_bias); // allocated before any state changes
        llama_engram * eg = engram_get(ctx);
        auto & s = eg->seqs[seq_id];                    // a failed insertion leaves the map as it was
        s.bias = std::move(values);
        s.gate = gate_pos;
        eg->update_key();
    } catch (const std::bad_alloc &) {
        return engram_fail(LLAMA_ENGRAM_ERR_ALLOC, "out of memory for a bias of %d positions", n_bias);
    }
    return engram_ok();
}

int32_t llama_engram_clear_seq(llama_context * ctx, llama_seq_id seq_id) {
    if (ctx == nullptr) {
        return engram_fail(LLAMA_ENGRAM_ERR_NULL, "context is NULL");
    }
    if (seq_id >= 0 && (uint32_t) seq_id >= llama_n_seq_max(ctx)) {
        return engram_fail(LLAMA_ENGRAM_ERR_SEQ, "sequence %d is out of range: the context has %u sequences", seq_id, llama_n_seq_max(ctx));
    }
    if (ctx->engram) {
        if (seq_id < 0) {
            ctx->engram->seqs.clear();
        } else {
            ctx->engram->seqs.erase(seq_id);
        }
        ctx->engram->update_key();
    }
    return engram_ok();
}

int32_t llama_engram_is_active(const llama_context * ctx) {
    if (ctx == nullptr) {
        engram_fail(LLAMA_ENGRAM_ERR_NULL, "context is NULL");
        return 0;
    }
    engram_ok();
    return llama_engram_graph_key(ctx->engram.get()) != 0 ? 1 : 0;
}

size_t llama_engram_mem_size(const llama_context * ctx) {
    if (ctx == nullptr || !ctx->engram) {
        return 0;
    }
    size_t n = ctx->engram->layer_scale.capacity()*sizeof(float);
    for (const auto & kv : ctx->engram->seqs) {
        n += kv.second.bias.capacity()*sizeof(float) + sizeof(kv);
    }
    return n;
}

} // extern "C"
