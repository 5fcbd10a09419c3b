// engram-llama: bias state held by a llama_context (llama_context::engram)
#pragma once

#include "llama.h"

#include <cstdint>
#include <map>
#include <vector>

struct llama_model;
struct llama_context;
struct llama_memory_context_i;
struct llama_hparams;
class  llama_kv_cache_context;

struct llama_engram_seq {
    std::vector<float> bias; // indexed by key position
    llama_pos          gate = 0; // bias applies to queries at positions >= gate
};

struct llama_engram {
    explicit llama_engram(llama_context * ctx);

    llama_context     * ctx;
    const llama_model & model;

    std::vector<float> layer_scale; // per layer, 0 = off

    std::map<llama_seq_id, llama_engram_seq> seqs;

    // cached llama_engram_graph_key(); recomputed on every change
    uint64_t key = 0;

    // key of the last graph built (set while building). A change of key asks the context to re-plan
    // its worst-case graph (update_key): two graphs with different biased layers can have the same
    // node and leaf counts, which is all ggml-alloc checks before reusing its allocation plan, and
    // a plan made without the bias would be redone on every growing ubatch.
    mutable uint64_t key_built = 0;

    void update_key();

    const llama_engram_seq * seq(llama_seq_id s) const {
        auto it = seqs.find(s);
        return it == seqs.end() ? nullptr : &it->second;
    }
};

// the KV cache context that serves layer il, or nullptr when the memory type is not supported
const llama_kv_cache_context * llama_engram_kv_ctx(const llama_memory_context_i * mctx, const llama_hparams & hparams, int il);
