// engram-llama: the one friend of llama.cpp's classes (declared in patches/): reads KV cell
// positions and K cache placement for the bias and asks a context to re-plan its graph
#pragma once

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

struct llama_engram_access {
    static const llama_kv_cache * cache(const llama_kv_cache_context * c) { return c->kv; }

    static const llama_kv_cells & cells(const llama_kv_cache * kv, llama_seq_id seq_id) {
        return kv->v_cells.at(kv->seq_to_stream[seq_id]);
    }

    // layer il's K cache tensor (nullptr when the cache does not hold that layer)
    static const ggml_tensor * k_cache(const llama_kv_cache * kv, int il) {
        const auto it = kv->map_layer_ids.find(il);
        return it == kv->map_layer_ids.end() ? nullptr : kv->layers[it->second].k;
    }

    static void request_reserve(llama_context * ctx) { ctx->sched_need_reserve = true; }
};
