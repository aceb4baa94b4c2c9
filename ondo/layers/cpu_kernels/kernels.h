/* The decoder-layer kernels of kernels.c, for the other files that call them. */
#ifndef ONDO_CPU_KERNELS_KERNELS_H
#define ONDO_CPU_KERNELS_KERNELS_H

#include <stdint.h>

void ondo_rms_norm(int dtype, const void *x, const void *residual, void *out, void *residual_out,
                   const void *weight, int weight_dtype, int64_t rows, int64_t n, int64_t x_stride,
                   int64_t residual_stride, int64_t out_stride, int64_t residual_out_stride, float eps,
                   float offset);
void ondo_gated(int dtype, int gelu_tanh, const void *x, void *out, int64_t rows, int64_t inter,
                int64_t x_stride, int64_t out_stride, int threads);
void ondo_rotary(int dtype, void *x, int64_t tokens, int64_t x_stride, int64_t heads, int64_t head_dim,
                 int64_t half, const void *cos, const void *signed_sin, int64_t table_stride);
void ondo_write_kv(int dtype, int cache_dtype, void *cache, int64_t num_slots, const void *k, const void *v,
                   int64_t tokens, int64_t width, int64_t k_stride, int64_t v_stride, const int64_t *slots);
void ondo_decode_attention(int dtype, int cache_dtype, const void *q, int64_t q_stride, void *out,
                           int64_t out_stride, const void *cache, int64_t num_slots, const int32_t *block_tables,
                           int64_t table_stride, const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                           int64_t window, float softcap, int threads);

#endif
