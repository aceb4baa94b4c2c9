/* An int4-planes matrix as ondo/layers/quantization/int4_planes.py stores it for the CPU, and its product. */
#ifndef ONDO_CPU_KERNELS_INT4_MM_H
#define ONDO_CPU_KERNELS_INT4_MM_H

#include "common.h"

typedef struct {
    const uint8_t *qweight;   /* [n_pad, planes * groups * group / 2] codes in torch's CPU tile layout */
    const void *sz;           /* [planes * groups, n_pad, 2]: scale and zero, w = (code - 8) scale + zero;
                                 F16_MIN: scale and zero - 8 scale, w = code scale + (zero - 8 scale) */
    int64_t k_in;             /* inputs: groups * 16 for groups of 16 padded to 32 (padded16), else groups * group */
    int64_t planes, group, n_pad, n_out, tile;
    int32_t sz_dtype, padded16;
    int32_t digits;           /* 2 planes that are one code's low and high digits (int4_planes.mark_digit_planes):
                                 the high plane's scales 16 times the low's, its zeros 0 */
} ondo_int4_weight;

/* bias: [n_out] in the activations' dtype, or NULL */
void ondo_int4_mm(int dtype, const void *x, int64_t rows, int64_t x_stride, const ondo_int4_weight *w,
                  const void *bias, void *out, int64_t out_stride, int threads);

/* 1 where the product rounds its activations to 16-bit integers per group (int4_mm.c: ROUNDED_X) */
int ondo_int4_rounds_activations(void);

#endif
