/* An int4-planes matrix as ondo/layers/quantization/int4_planes.py stores it for the CPU, and its product. */
#ifndef ONDO_CPU_KERNELS_INT4_MM_H
#define ONDO_CPU_KERNELS_INT4_MM_H

#include "common.h"

typedef struct {
    const uint8_t *qweight;   /* [n_pad, planes * groups * group / 2] codes in torch's CPU tile layout */
    const void *sz;           /* [planes * groups, n_pad, 2], or with sz_blocks [n_pad / SZ_BLOCK, planes * groups,
                                 SZ_BLOCK, 2]: scale and zero, w = (code - 8) scale + zero;
                                 F16_MIN: scale and zero - 8 scale, w = code scale + (zero - 8 scale) */
    int64_t k_in;             /* inputs: groups * 16 for groups of 16 padded to 32 (padded16), else groups * group */
    int64_t planes, group, n_pad, n_out, tile;
    int32_t sz_dtype, padded16;
    int32_t digits;           /* 2 planes that are one code's low and high digits (int4_planes.mark_digit_planes):
                                 the high plane's scales 16 times the low's, its zeros 0 */
    int32_t layout;           /* of the codes, in tiles of 32 rows where not 0 (int4_planes.CodesLayout; only where
                                 ondo_int4_reads_code_bytes): 0 torch's tiles; 1 digits as whole 8-bit codes,
                                 byte [tile, k / 2, d, k % 2] = row d's low digit | high digit << 4; 2 torch's
                                 bytes of each pair of k interleaved, [tile, k / 2, d, k % 2] for d < 16 */
    int32_t sz_blocks;        /* sz in blocks of SZ_BLOCK rows (int4_planes.block_cpu_scales) */
} ondo_int4_weight;

enum { SZ_BLOCK = 32 };

/* bias: [n_out] in the activations' dtype, or NULL */
void ondo_int4_mm(int dtype, const void *x, int64_t rows, int64_t x_stride, const ondo_int4_weight *w,
                  const void *bias, void *out, int64_t out_stride, int threads);

/* out [count, k_in] (dtype): rows `rows` of the weight, dequantized; -1 (nothing written) where a row is
 * not one of the n_out */
int ondo_int4_rows(int dtype, const ondo_int4_weight *w, const int64_t *rows, int64_t count, void *out);

/* 1 where the product rounds its activations to 16-bit integers per group (int4_mm.c: ROUNDED_X) */
int ondo_int4_rounds_activations(void);

/* 1 where the product reads digit planes stored as code bytes (int4_mm.c: CODE_BYTES) */
int ondo_int4_reads_code_bytes(void);

#endif
