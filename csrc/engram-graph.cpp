// engram-llama: the graph side of the bias. At a biased layer the KQ mask is replaced by an input
// tensor of the same shape and type holding mask + scale*bias; it is filled on the host at
// set_input time from the KV cells' positions, so no backend code is involved and flash attention
// (which consumes the mask) sees the bias too.

#include "engram-graph.h"
#include "engram-state.h"
#include "engram-access.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstring>
#include <vector>

namespace {

struct engram_mask_entry {
    ggml_tensor * src;   // the model's mask for this layer
    ggml_tensor * out;   // src + scale*bias
    int           il;    // a layer that uses it (selects the KV cache)
    float         scale;
    bool          copy;  // src is a graph input filled before `out`: copy it instead of recomputing
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
        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            GGML_ASSERT(kvc != nullptr);

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

        bool res = eg != nullptr;
        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            res = res && kvc != nullptr && e.out->ne[0] == (int64_t) kvc->get_n_kv() &&
                  e.out->ne[1]*e.out->ne[3] == (int64_t) params.ubatch.n_tokens;
        }
        return res;
    }

    std::vector<engram_mask_entry> entries;

private:
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
            const llama_engram_seq * sb = eg->seq(seq_id);
            if (sb == nullptr || sb->bias.empty() || ubatch->pos[i] < sb->gate) {
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
                        row_v.push_back(e.scale*sb->bias[p]);
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
    if (llama_engram_kv_ctx(gctx.mctx, gctx.hparams, il) == nullptr) {
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

    // layers with the same mask and strength share one filled mask
    for (const auto & e : inp->entries) {
        if (e.src == kq_mask && e.scale == scale) {
            return e.out;
        }
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

    inp->entries.push_back({ kq_mask, out, il, scale, copy });

    return out;
}
