// engram-llama: the graph side of the bias. At a biased layer the KQ mask is replaced by
// mask + scale*bias, computed in the graph from two small inputs that are filled on the host at
// set_input time from the KV cells' positions (see below); only standard ggml ops are used, so
// every backend runs it and flash attention (which consumes the mask) sees the bias too.

#include "engram-graph.h"
#include "engram-state.h"
#include "engram-access.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <vector>

namespace {

// A biased layer's mask is built in the graph: out = mask + outer(B, G), with
//   B [n_kv, n_seq]:     scale*bias of each KV cell, one column per sequence (its stream's cells)
//   G [n_tokens, n_seq]: 1 where the query belongs to that sequence and is past its gate, else 0.
// Only these two small inputs are filled on the host; the n_kv x n_tokens sum is computed by the
// backend, next to the model's own mask, so a GPU does not wait on a host-built second mask.
struct engram_mask_entry {
    ggml_tensor * src;   // the model's mask for this layer
    ggml_tensor * out;   // src + outer(b, g)
    ggml_tensor * b;     // [n_kv, n_seq] input
    int           il;    // a layer that uses it (selects the KV cache)
    float         scale;
};

class llm_graph_input_engram : public llm_graph_input_i {
public:
    llm_graph_input_engram(const llama_engram * eg, const llama_hparams & hparams, const llama_memory_context_i * mctx, ggml_tensor * g)
        : g(g), eg(eg), hparams(hparams), mctx(mctx) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_ASSERT(ggml_backend_buffer_is_host(g->buffer));
        const int64_t n_seq = g->ne[1];
        const uint32_t n_tokens = ubatch->n_tokens;
        GGML_ASSERT(g->ne[0] == (int64_t) n_tokens);

        // which queries of which sequence are biased; sequences with none get a zero column
        float * gd = (float *) g->data;
        std::fill(gd, gd + ggml_nelements(g), 0.0f);
        std::vector<bool> live(n_seq, false);
        for (uint32_t i = 0; i < n_tokens; ++i) {
            const llama_seq_id seq_id = ubatch->seq_id[i][0];
            const llama_engram_seq * sb = eg->seq(seq_id);
            if (seq_id < 0 || seq_id >= n_seq || sb == nullptr || sb->bias.empty() || ubatch->pos[i] < sb->gate) {
                continue;
            }
            gd[(int64_t) seq_id*n_tokens + i] = 1.0f;
            live[seq_id] = true;
        }

        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            GGML_ASSERT(kvc != nullptr);
            GGML_ASSERT(ggml_backend_buffer_is_host(e.b->buffer));
            const llama_kv_cache * kv = llama_engram_access::cache(kvc);

            const int64_t n_kv = e.b->ne[0];
            float * bd = (float *) e.b->data;
            std::fill(bd, bd + ggml_nelements(e.b), 0.0f);

            for (llama_seq_id s = 0; s < n_seq; ++s) {
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
                        col[j] = e.scale*sb->bias[p];
                    }
                }
            }
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        // the topology is pinned by llm_graph_params::engram_key; only the memory context moves
        mctx = params.mctx;
        eg   = params.engram;

        bool res = eg != nullptr && g->ne[0] == (int64_t) params.ubatch.n_tokens;
        for (const auto & e : entries) {
            const llama_kv_cache_context * kvc = llama_engram_kv_ctx(mctx, hparams, e.il);
            res = res && kvc != nullptr && e.b->ne[0] == (int64_t) kvc->get_n_kv() &&
                  e.out->ne[0] == (int64_t) kvc->get_n_kv() &&
                  e.out->ne[1]*e.out->ne[3] == (int64_t) params.ubatch.n_tokens;
        }
        return res;
    }

    std::vector<engram_mask_entry> entries;
    ggml_tensor * g; // [n_tokens, n_seq] input, shared by the entries

private:
    const llama_engram * eg;
    const llama_hparams & hparams;
    const llama_memory_context_i * mctx;
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

    const int64_t n_tokens = kq_mask->ne[1]*kq_mask->ne[2]*kq_mask->ne[3];
    const int64_t n_seq    = std::max<int64_t>(1, gctx.cparams.n_seq_max);

    llm_graph_input_engram * inp = nullptr;
    for (auto & p : gctx.res->inputs) {
        if ((inp = dynamic_cast<llm_graph_input_engram *>(p.get())) != nullptr) {
            break;
        }
    }
    if (inp == nullptr) {
        ggml_tensor * g = ggml_new_tensor_2d(gctx.ctx0, GGML_TYPE_F32, n_tokens, n_seq);
        ggml_set_input(g);
        ggml_set_name(g, "engram_gate");
        inp = (llm_graph_input_engram *) gctx.res->add_input(
                std::make_unique<llm_graph_input_engram>(eg, gctx.hparams, gctx.mctx, g));
    }
    GGML_ASSERT(inp->g->ne[0] == n_tokens);

    // layers with the same mask and strength share one biased mask
    for (const auto & e : inp->entries) {
        if (e.src == kq_mask && e.scale == scale) {
            return e.out;
        }
    }

    ggml_tensor * b = ggml_new_tensor_2d(gctx.ctx0, GGML_TYPE_F32, kq_mask->ne[0], n_seq);
    ggml_set_input(b);
    ggml_format_name(b, "engram_bias-%d", il);

    ggml_tensor * bias = ggml_out_prod(gctx.ctx0, b, inp->g); // [n_kv, n_tokens]
    bias = ggml_reshape_4d(gctx.ctx0, bias, kq_mask->ne[0], kq_mask->ne[1], kq_mask->ne[2], kq_mask->ne[3]);
    if (kq_mask->type != GGML_TYPE_F32) {
        bias = ggml_cast(gctx.ctx0, bias, kq_mask->type);
    }
    ggml_tensor * out = ggml_add(gctx.ctx0, kq_mask, bias);
    ggml_format_name(out, "engram_kq_mask-%d", il);

    inp->entries.push_back({ kq_mask, out, b, il, scale });

    return out;
}
