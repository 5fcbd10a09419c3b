// engram-llama: the graph side of the bias. At a biased layer the KQ mask is replaced by
// mask + scale*bias, built in one of two ways, chosen per layer by where its K cache lives:
//
// - host (the KV cache is in host memory: CPU, Metal's shared memory): a second input of the
//   mask's shape, filled at set_input time with a copy of the model's mask plus the bias at the
//   biased cells only. On the CPU this costs a memcpy; dense graph ops cost more (F16 adds).
// - graph (the KV cache is on a discrete GPU): mask + out_prod(B, G), from two small inputs,
//   B [n_kv, n_seq] (scale*bias of each cell, one column per sequence) and G [n_tokens, n_seq]
//   (1 where a query belongs to the sequence and is past its gate). Uploading a host-built mask
//   per ubatch cost an H100 more than computing it there (docs/PERFORMANCE.md, GPU; both
//   measured before the hook re-planned on activation, engram-bias.cpp).
//
// Both use only standard ggml ops and inputs, so every backend runs them, and flash attention
// (which consumes the mask) sees the bias too. ENGRAM_LLAMA_MASK=host|graph forces one (tests).

#include "engram-graph.h"
#include "engram-state.h"
#include "engram-access.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// a strength times a bias, kept finite in an F16 mask (flash attention's): +inf there would make the
// softmax NaN, and inf * 0 would spread NaN to the rows the gate leaves unbiased. Beyond a few tens
// the bias saturates the softmax anyway: 65504 (F16's largest) selects or hides a key as 1e9 does.
constexpr float ENGRAM_BIAS_MAX = 65504.0f;

float engram_scaled(float scale, float bias) {
    return std::clamp(scale*bias, -ENGRAM_BIAS_MAX, ENGRAM_BIAS_MAX);
}

struct engram_mask_entry {
    ggml_tensor * src;   // the model's mask for this layer
    ggml_tensor * out;   // src + scale*bias
    ggml_tensor * b;     // graph path: the [n_kv, n_seq] input; nullptr on the host path
    int           il;    // a layer that uses it (selects the KV cache)
    float         scale;
    bool          copy;  // host path: src is a graph input filled before `out`, copy it
};

template <typename T> static float to_f32(T v);
template <> float to_f32<float>(float v) { return v; }
template <> float to_f32<ggml_fp16_t>(ggml_fp16_t v) { return ggml_fp16_to_fp32(v); }

template <typename T> static T from_f32(float v);
template <> float from_f32<float>(float v) { return v; }
template <> ggml_fp16_t from_f32<ggml_fp16_t>(float v) { return ggml_fp32_to_fp16(v); }

class llm_graph_input_engram : public llm_graph_input_i {
public:
    llm_graph_input_engram(const llama_engram * eg, const llama_hparams & hparams, const llama_memory_context_i * mctx, bool causal_attn)
        : eg(eg), hparams(hparams), mctx(mctx), causal_attn(causal_attn) {}

    void set_input(const llama_ubatch * ubatch) override {
        std::vector<bool> live;
        if (g != nullptr) {
            fill_gate(ubatch, live);
        }
        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            GGML_ASSERT(kvc != nullptr);

            if (e.b != nullptr) {
                fill_cells(e, kvc, live);
                continue;
            }

            // the same mask the model's own input gets: copied when that input was filled before
            // this one (it is registered first, so it is), recomputed otherwise ...
            if (e.copy && e.src->data != nullptr && ggml_backend_buffer_is_host(e.src->buffer)) {
                memcpy(e.out->data, e.src->data, ggml_nbytes(e.out));
            } else {
                kvc->set_input_kq_mask(e.out, ubatch, causal_attn);
            }

            // ... plus the bias
            if (e.out->type == GGML_TYPE_F16) {
                add_bias<ggml_fp16_t>(e, kvc, ubatch);
            } else {
                GGML_ASSERT(e.out->type == GGML_TYPE_F32);
                add_bias<float>(e, kvc, ubatch);
            }
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        // the topology is pinned by llm_graph_params::engram_key; only the memory context moves
        mctx = params.mctx;
        eg   = params.engram;

        bool res = eg != nullptr && (g == nullptr || g->ne[0] == (int64_t) params.ubatch.n_tokens);
        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            res = res && kvc != nullptr && e.out->ne[0] == (int64_t) kvc->get_n_kv() &&
                  e.out->ne[1]*e.out->ne[3] == (int64_t) params.ubatch.n_tokens &&
                  (e.b == nullptr || e.b->ne[0] == (int64_t) kvc->get_n_kv());
        }
        return res;
    }

    std::vector<engram_mask_entry> entries;
    ggml_tensor * g = nullptr; // graph path: [n_tokens, n_seq] input shared by its entries

private:
    // the bias of query i's sequence when that query is biased (a bias set, past its gate)
    const llama_engram_seq * biased_seq(const llama_ubatch * ubatch, uint32_t i) const {
        const llama_engram_seq * sb = eg->seq(ubatch->seq_id[i][0]);
        return sb != nullptr && !sb->bias.empty() && ubatch->pos[i] >= sb->gate ? sb : nullptr;
    }

    // G: which queries of which sequence are biased; `live` marks the sequences that have any
    void fill_gate(const llama_ubatch * ubatch, std::vector<bool> & live) const {
        GGML_ASSERT(ggml_backend_buffer_is_host(g->buffer));
        const int64_t n_seq = g->ne[1];
        const uint32_t n_tokens = ubatch->n_tokens;
        GGML_ASSERT(g->ne[0] == (int64_t) n_tokens);

        float * gd = (float *) g->data;
        std::fill(gd, gd + ggml_nelements(g), 0.0f);
        live.assign(n_seq, false);
        for (uint32_t i = 0; i < n_tokens; ++i) {
            const llama_seq_id seq_id = ubatch->seq_id[i][0];
            if (seq_id < 0 || seq_id >= n_seq || biased_seq(ubatch, i) == nullptr) {
                continue;
            }
            gd[(int64_t) seq_id*n_tokens + i] = 1.0f;
            live[seq_id] = true;
        }
    }

    // B: scale*bias of every cell, per live sequence (in its stream's cell numbering)
    void fill_cells(const engram_mask_entry & e, const llama_kv_cache_context * kvc, const std::vector<bool> & live) const {
        GGML_ASSERT(ggml_backend_buffer_is_host(e.b->buffer));
        const llama_kv_cache * kv = llama_engram_access::cache(kvc);
        const int64_t n_kv = e.b->ne[0];

        float * bd = (float *) e.b->data;
        std::fill(bd, bd + ggml_nelements(e.b), 0.0f);
        for (llama_seq_id s = 0; s < (llama_seq_id) live.size(); ++s) {
            if (!live[s]) {
                continue;
            }
            const llama_engram_seq * sb = eg->seq(s);
            const llama_kv_cells & cells = llama_engram_access::cells(kv, s);
            const llama_pos n_bias = (llama_pos) sb->bias.size();
            float * col = bd + (int64_t) s*n_kv;
            for (int64_t j = 0; j < n_kv; ++j) {
                if (cells.is_empty(j) || !cells.seq_has(j, s)) {
                    continue;
                }
                const llama_pos p = cells.pos_get(j);
                if (p >= 0 && p < n_bias) {
                    col[j] = engram_scaled(e.scale, sb->bias[p]);
                }
            }
        }
    }

    template <typename T>
    void add_bias(const engram_mask_entry & e, const llama_kv_cache_context * kvc, const llama_ubatch * ubatch) {
        const llama_kv_cache * kv = llama_engram_access::cache(kvc);

        const int64_t n_kv     = e.out->ne[0];
        const uint32_t n_tokens = ubatch->n_tokens;

        T * data = (T *) e.out->data;

        // the bias over the cells is the same for every query of a sequence: build it once
        llama_seq_id row_seq = -1;

        for (uint32_t i = 0; i < n_tokens; ++i) {
            const llama_seq_id seq_id = ubatch->seq_id[i][0];
            const llama_engram_seq * sb = biased_seq(ubatch, i);
            if (sb == nullptr) {
                continue;
            }

            if (seq_id != row_seq) {
                row_seq = seq_id;
                row_j.clear();
                row_v.clear();

                const llama_kv_cells & cells = llama_engram_access::cells(kv, seq_id);
                const llama_pos n_bias = (llama_pos) sb->bias.size();
                for (int64_t j = 0; j < n_kv; ++j) {
                    if (cells.is_empty(j) || !cells.seq_has(j, seq_id)) {
                        continue;
                    }
                    const llama_pos p = cells.pos_get(j);
                    if (p >= 0 && p < n_bias && sb->bias[p] != 0.0f) {
                        row_j.push_back(j);
                        row_v.push_back(engram_scaled(e.scale, sb->bias[p]));
                    }
                }
            }

            // only the biased cells are touched: a few passages of the context, not all of it
            T * dst = data + (int64_t) i*n_kv;
            for (size_t k = 0; k < row_j.size(); ++k) {
                const int64_t j = row_j[k];
                dst[j] = from_f32<T>(to_f32<T>(dst[j]) + row_v[k]);
            }
        }
    }

    const llama_engram * eg;
    const llama_hparams & hparams;
    const llama_memory_context_i * mctx;
    const bool causal_attn;

    std::vector<int64_t> row_j; // biased cells of the current sequence and their scaled bias
    std::vector<float>   row_v;
};

// the graph path where layer il's K cache is off the host, or as ENGRAM_LLAMA_MASK forces
static bool engram_use_graph_path(const llama_kv_cache_context * kvc, int il) {
    const char * force = getenv("ENGRAM_LLAMA_MASK");
    if (force != nullptr && strcmp(force, "graph") == 0) {
        return true;
    }
    if (force != nullptr && strcmp(force, "host") == 0) {
        return false;
    }
    const ggml_tensor * k = llama_engram_access::k_cache(llama_engram_access::cache(kvc), il);
    return k != nullptr && k->buffer != nullptr && !ggml_backend_buffer_is_host(k->buffer);
}

} // namespace

ggml_tensor * llama_engram_build_mask(const llm_graph_context & gctx, ggml_tensor * kq_mask, int il) {
    const llama_engram * eg = gctx.engram;
    if (eg != nullptr) {
        eg->key_built = eg->key;
    }
    if (eg == nullptr || eg->key == 0 || kq_mask == nullptr || il < 0 || (size_t) il >= eg->layer_scale.size()) {
        return kq_mask;
    }
    const float scale = eg->layer_scale[il];
    if (scale == 0.0f) {
        return kq_mask;
    }
    // attention without a KV cache of a supported type (encoders, cross attention) is left alone
    const llama_kv_cache_context * kvc = llama_engram_kv_ctx(gctx.mctx, gctx.hparams, il);
    if (kvc == nullptr) {
        return kq_mask;
    }

    llm_graph_input_engram * inp = nullptr;
    for (auto & p : gctx.res->inputs) {
        if ((inp = dynamic_cast<llm_graph_input_engram *>(p.get())) != nullptr) {
            break;
        }
    }
    if (inp == nullptr) {
        inp = (llm_graph_input_engram *) gctx.res->add_input(
                std::make_unique<llm_graph_input_engram>(eg, gctx.hparams, gctx.mctx, gctx.cparams.causal_attn));
    }

    // layers with the same mask and strength share one biased mask
    for (const auto & e : inp->entries) {
        if (e.src == kq_mask && e.scale == scale) {
            return e.out;
        }
    }

    if (engram_use_graph_path(kvc, il)) {
        const int64_t n_tokens = kq_mask->ne[1]*kq_mask->ne[2]*kq_mask->ne[3];
        if (inp->g == nullptr) {
            inp->g = ggml_new_tensor_2d(gctx.ctx0, GGML_TYPE_F32, n_tokens, std::max<int64_t>(1, gctx.cparams.n_seq_max));
            ggml_set_input(inp->g);
            ggml_set_name(inp->g, "engram_gate");
        }
        GGML_ASSERT(inp->g->ne[0] == n_tokens);

        ggml_tensor * b = ggml_new_tensor_2d(gctx.ctx0, GGML_TYPE_F32, kq_mask->ne[0], inp->g->ne[1]);
        ggml_set_input(b);
        ggml_format_name(b, "engram_bias-%d", il);

        ggml_tensor * bias = ggml_out_prod(gctx.ctx0, b, inp->g); // [n_kv, n_tokens]
        bias = ggml_reshape_4d(gctx.ctx0, bias, kq_mask->ne[0], kq_mask->ne[1], kq_mask->ne[2], kq_mask->ne[3]);
        if (kq_mask->type != GGML_TYPE_F32) {
            bias = ggml_cast(gctx.ctx0, bias, kq_mask->type);
        }
        ggml_tensor * out = ggml_add(gctx.ctx0, kq_mask, bias);
        ggml_format_name(out, "engram_kq_mask-%d", il);

        inp->entries.push_back({ kq_mask, out, b, il, scale, false });
        return out;
    }

    // keep the model's own mask in the graph even when every layer that reads it is biased: its
    // input class fills it unconditionally (the hybrid memory ones do not check for a buffer)
    ggml_build_forward_expand(gctx.gf, kq_mask);

    ggml_tensor * out = ggml_new_tensor(gctx.ctx0, kq_mask->type, GGML_MAX_DIMS, kq_mask->ne);
    ggml_set_input(out);
    ggml_format_name(out, "engram_kq_mask-%d", il);

    // the model's mask input was registered in res->inputs before this one (its tensor exists
    // before the first attention is built), so by our set_input it holds this ubatch's mask
    const bool copy = (kq_mask->flags & GGML_TENSOR_FLAG_INPUT) != 0 && ggml_is_contiguous(kq_mask) &&
                      ggml_are_same_shape(kq_mask, out) && kq_mask->type == out->type;

    inp->entries.push_back({ kq_mask, out, nullptr, il, scale, copy });

    return out;
}
