// C test of the engram bias API, for sanitizer runs (scripts/asan.sh): every refusal path, many
// set/clear cycles, decodes with the bias on and off, and context teardown with state held.
//
// usage: test-engram-c MODEL.gguf

#include "engram_bias.h"
#include "llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_fail = 0;

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK failed: %s (%s)\n", __FILE__, __LINE__, #cond, llama_engram_last_error()); g_fail++; } } while (0)

static void quiet(enum ggml_log_level level, const char * text, void * ud) { (void) level; (void) text; (void) ud; }

static int decode_all(struct llama_context * ctx, const llama_token * toks, int n, float * out_last, int n_vocab) {
    llama_memory_clear(llama_get_memory(ctx), true);
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = i == n - 1;
    }
    b.n_tokens = n;
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    if (rc == 0) {
        memcpy(out_last, llama_get_logits_ith(ctx, n - 1), sizeof(float) * n_vocab);
    }
    return rc;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 2; }

    const int n_layer = llama_model_n_layer(model);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    CHECK(llama_engram_version() == LLAMA_ENGRAM_API_VERSION);
    CHECK(llama_engram_layer_kind(NULL, 0) == LLAMA_ENGRAM_LAYER_INVALID);
    CHECK(llama_engram_layer_kind(model, -1) == LLAMA_ENGRAM_LAYER_INVALID);
    CHECK(llama_engram_layer_kind(model, n_layer) == LLAMA_ENGRAM_LAYER_INVALID);

    int softmax_layer = -1, none_layer = -1;
    for (int il = 0; il < n_layer; ++il) {
        int k = llama_engram_layer_kind(model, il);
        if (k == LLAMA_ENGRAM_LAYER_NONE && none_layer < 0) none_layer = il;
        if (k != LLAMA_ENGRAM_LAYER_NONE && softmax_layer < 0) softmax_layer = il;
    }
    CHECK(softmax_layer >= 0);

    for (int fa = 0; fa <= 1; ++fa) {
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 64; cp.n_seq_max = 2; cp.n_threads = 2; cp.n_threads_batch = 2;
        cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        struct llama_context * ctx = llama_init_from_model(model, cp);
        CHECK(ctx != NULL);
        const int n_ctx_seq = (int) llama_n_ctx_seq(ctx);

        // refusals
        CHECK(llama_engram_set_layer(NULL, 0, 1.0f) == LLAMA_ENGRAM_ERR_NULL);
        CHECK(llama_engram_set_layer(ctx, -1, 1.0f) == LLAMA_ENGRAM_ERR_LAYER);
        CHECK(llama_engram_set_layer(ctx, n_layer, 1.0f) == LLAMA_ENGRAM_ERR_LAYER);
        CHECK(llama_engram_set_layer(ctx, softmax_layer, NAN) == LLAMA_ENGRAM_ERR_VALUE);
        CHECK(llama_engram_set_layer(ctx, softmax_layer, INFINITY) == LLAMA_ENGRAM_ERR_VALUE);
        if (none_layer >= 0) {
            CHECK(llama_engram_set_layer(ctx, none_layer, 1.0f) == LLAMA_ENGRAM_ERR_NO_SOFTMAX);
            CHECK(strstr(llama_engram_last_error(), "no softmax attention") != NULL);
        }
        float bias[300];
        for (int i = 0; i < 300; ++i) bias[i] = (float) ((i * 7) % 11) - 5.0f;
        CHECK(llama_engram_set_seq(ctx, 0, NULL, 4, 0) == LLAMA_ENGRAM_ERR_NULL);
        CHECK(llama_engram_set_seq(ctx, 0, bias, -1, 0) == LLAMA_ENGRAM_ERR_VALUE);
        CHECK(llama_engram_set_seq(ctx, 0, bias, 0, -1) == LLAMA_ENGRAM_ERR_VALUE);
        CHECK(llama_engram_set_seq(ctx, 2, bias, 4, 0) == LLAMA_ENGRAM_ERR_SEQ);
        CHECK(llama_engram_set_seq(ctx, 0, bias, n_ctx_seq + 1, 0) == LLAMA_ENGRAM_ERR_LENGTH);
        float bad[3] = { 0.0f, NAN, 1.0f };
        CHECK(llama_engram_set_seq(ctx, 0, bad, 3, 0) == LLAMA_ENGRAM_ERR_VALUE);
        CHECK(llama_engram_clear_seq(ctx, 5) == LLAMA_ENGRAM_ERR_SEQ);
        float s = -1.0f;
        CHECK(llama_engram_get_layer(ctx, softmax_layer, NULL) == LLAMA_ENGRAM_ERR_NULL);
        CHECK(llama_engram_get_layer(ctx, softmax_layer, &s) == LLAMA_ENGRAM_OK && s == 0.0f);

        // cycles
        for (int i = 0; i < 10000; ++i) {
            CHECK(llama_engram_set_seq(ctx, i % 2, bias, 1 + i % 200, i % 17) == LLAMA_ENGRAM_OK);
            CHECK(llama_engram_set_layer(ctx, softmax_layer, (float) (i % 4)) == LLAMA_ENGRAM_OK);
            CHECK(llama_engram_clear_seq(ctx, (i % 3 == 0) ? -1 : i % 2) == LLAMA_ENGRAM_OK);
        }
        CHECK(llama_engram_clear_seq(ctx, -1) == LLAMA_ENGRAM_OK);
        CHECK(llama_engram_clear_layers(ctx) == LLAMA_ENGRAM_OK);
        CHECK(!llama_engram_is_active(ctx));

        // decodes: vanilla, biased on every softmax layer, cleared again
        llama_token toks[100];
        for (int i = 0; i < 100; ++i) toks[i] = (i * 31 + 7) % n_vocab;
        float * ref = malloc(sizeof(float) * n_vocab);
        float * got = malloc(sizeof(float) * n_vocab);
        CHECK(decode_all(ctx, toks, 100, ref, n_vocab) == 0);
        for (int il = 0; il < n_layer; ++il) {
            if (llama_engram_layer_kind(model, il) != LLAMA_ENGRAM_LAYER_NONE) {
                CHECK(llama_engram_set_layer(ctx, il, 2.0f) == LLAMA_ENGRAM_OK);
            }
        }
        CHECK(llama_engram_set_seq(ctx, 0, bias, 100, 50) == LLAMA_ENGRAM_OK);
        CHECK(llama_engram_is_active(ctx));
        CHECK(decode_all(ctx, toks, 100, got, n_vocab) == 0);
        CHECK(memcmp(ref, got, sizeof(float) * n_vocab) != 0);
        CHECK(llama_engram_set_layer(ctx, softmax_layer, 0.5f) == LLAMA_ENGRAM_OK); // topology change
        CHECK(decode_all(ctx, toks, 100, got, n_vocab) == 0);
        CHECK(llama_engram_clear_seq(ctx, 0) == LLAMA_ENGRAM_OK);
        CHECK(decode_all(ctx, toks, 100, got, n_vocab) == 0);
        CHECK(memcmp(ref, got, sizeof(float) * n_vocab) == 0);

        // freed with bias state still held
        CHECK(llama_engram_set_seq(ctx, 1, bias, 200, 0) == LLAMA_ENGRAM_OK);
        free(ref);
        free(got);
        llama_free(ctx);
    }

    llama_model_free(model);
    llama_backend_free();
    if (g_fail) {
        fprintf(stderr, "test-engram-c: %d checks failed\n", g_fail);
        return 1;
    }
    printf("test-engram-c: all checks passed\n");
    return 0;
}
