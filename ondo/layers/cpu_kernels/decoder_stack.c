/* A decode step's Llama-family decoder layers in one call: the CPU's counterpart of a CUDA graph.
 *
 * Why: with every op of a layer in C already (kernels.c, int4_mm.c), a decode step of a small model on
 * a CPU still spent more than half its time in Python between them: some 25 calls, module dispatches
 * and tensor allocations per layer, 30 layers a step. Here the same kernels run in the same order on
 * the same values as ondo/models/llama.py's eager forward, so the result is bit for bit the eager one
 * (tests/models/test_cpu_decode_stack.py); ondo/models/cpu_decode.py decides when it applies.
 *
 * Per layer, for `batch` sequences of one new token each (rows of `hidden` and `residual`):
 *   normed, residual = rms_norm(hidden + residual)     (layer 0: rms_norm(hidden), residual = hidden)
 *   qkv = normed W_qkv^T (+ b); q, k rotated in place; k, v written to the cache; attn = attention(q)
 *   hidden = attn W_o^T (+ b); normed, residual = rms_norm(hidden + residual)
 *   hidden = act(normed W_gate^T) * (normed W_up^T) W_down^T
 */
#include "int4_mm.h"
#include "kernels.h"

typedef struct {
    const void *input_norm, *post_attention_norm;   /* RMSNorm weights, in the shape's norm_dtype */
    ondo_int4_weight qkv, o, gate_up, down;
    const void *qkv_bias, *o_bias, *gate_up_bias, *down_bias;   /* in the activations' dtype, or NULL */
    void *kv_cache;                                  /* [2, num_slots, kv_heads * head_dim] */
    int64_t window;                                  /* sliding window, 0 for none */
} ondo_llama_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, rot_half, block_size, num_slots;
    float eps, scale, softcap;                       /* softcap 0: none */
    int32_t norm_dtype, gelu_tanh, kv_dtype;        /* kv_dtype: the cache's element type (common.h) */
} ondo_llama_shape;

/* hidden [batch, H] holds the embeddings on entry and the last layer's MLP output on return; residual
 * [batch, H] the residual stream on return. cos / signed_sin [batch, 2 * rot_half] (rotation_tables). */
void ondo_llama_decode(int dtype, const ondo_llama_layer *layers, int64_t num_layers, const ondo_llama_shape *s,
                       void *hidden, void *residual, int64_t batch, const void *cos, const void *signed_sin,
                       const int64_t *slot_mapping, const int32_t *block_tables, int64_t table_stride,
                       const int32_t *seq_lens, int threads) {
    const int64_t elem = elem_size(dtype), q_width = s->heads * s->head_dim;
    const int64_t kv_width = s->kv_heads * s->head_dim, qkv_width = q_width + 2 * kv_width;
    char *scratch = malloc((size_t)(batch * (s->hidden + qkv_width + q_width + 3 * s->inter) * elem));
    char *normed = scratch, *qkv = normed + batch * s->hidden * elem, *attn = qkv + batch * qkv_width * elem;
    char *gate_up = attn + batch * q_width * elem, *act = gate_up + batch * 2 * s->inter * elem;
    for (int64_t l = 0; l < num_layers; l++) {
        const ondo_llama_layer *layer = layers + l;
        if (l == 0) {
            memcpy(residual, hidden, (size_t)(batch * s->hidden * elem));
            ondo_rms_norm(dtype, hidden, NULL, normed, NULL, layer->input_norm, s->norm_dtype, batch, s->hidden,
                          s->hidden, 0, s->hidden, 0, s->eps, 0.0f);
        } else {
            ondo_rms_norm(dtype, hidden, residual, normed, residual, layer->input_norm, s->norm_dtype, batch,
                          s->hidden, s->hidden, s->hidden, s->hidden, s->hidden, s->eps, 0.0f);
        }
        ondo_int4_mm(dtype, normed, batch, s->hidden, &layer->qkv, layer->qkv_bias, qkv, qkv_width, threads);
        ondo_rotary(dtype, qkv, batch, qkv_width, s->heads + s->kv_heads, s->head_dim, s->rot_half, cos,
                    signed_sin, 2 * s->rot_half);
        ondo_write_kv(dtype, s->kv_dtype, layer->kv_cache, s->num_slots, qkv + q_width * elem, qkv + (q_width + kv_width) * elem,
                      batch, kv_width, qkv_width, qkv_width, slot_mapping);
        ondo_decode_attention(dtype, s->kv_dtype, qkv, qkv_width, attn, q_width, layer->kv_cache, s->num_slots, block_tables,
                              table_stride, seq_lens, batch, s->heads, s->kv_heads, s->head_dim, s->block_size,
                              s->scale, layer->window, s->softcap, threads);
        ondo_int4_mm(dtype, attn, batch, q_width, &layer->o, layer->o_bias, hidden, s->hidden, threads);
        ondo_rms_norm(dtype, hidden, residual, normed, residual, layer->post_attention_norm, s->norm_dtype, batch,
                      s->hidden, s->hidden, s->hidden, s->hidden, s->hidden, s->eps, 0.0f);
        ondo_int4_mm(dtype, normed, batch, s->hidden, &layer->gate_up, layer->gate_up_bias, gate_up, 2 * s->inter,
                     threads);
        ondo_gated(dtype, s->gelu_tanh, gate_up, act, batch, s->inter, 2 * s->inter, s->inter, threads);
        ondo_int4_mm(dtype, act, batch, s->inter, &layer->down, layer->down_bias, hidden, s->hidden, threads);
    }
    free(scratch);
}
