// engram-llama: the internal interface that the llama.cpp patch calls (see patches/)
#pragma once

#include <cstdint>

struct ggml_tensor;
struct llama_engram;
struct llm_graph_context;

// the mask to use at layer il: kq_mask itself when the layer is not biased, otherwise a tensor of
// the same shape and type holding kq_mask + scale*bias (filled on the host, or computed in the
// graph where the layer's KV cache is on a GPU; see engram-graph.cpp)
ggml_tensor * llama_engram_build_mask(const llm_graph_context & gctx, ggml_tensor * kq_mask, int il);

// identifies the graph topology that the bias needs; 0 when no bias is active (unpatched graph)
uint64_t llama_engram_graph_key(const llama_engram * eg);
