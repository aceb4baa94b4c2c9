/* What ondo's CPU kernels share: the element types of a row and their conversions to float32. */
#ifndef ONDO_CPU_KERNELS_COMMON_H
#define ONDO_CPU_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

/* Element types of rows: activations are F32 or BF16; the KV cache may also be F16 (kv_cache_dtype). */
enum { F32 = 0, BF16 = 1, F16 = 2 };
/* int4 scales (ondo_int4_weight.sz_dtype): F32 and BF16 pairs (scale, zero); F16_MIN pairs (scale, zero - 8 scale) */
enum { F16_MIN = 2 };

static inline int64_t elem_size(int dtype) {
    return dtype == F32 ? 4 : 2;
}


static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}

static inline float f16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31u, mantissa = h & 1023u;
    union { uint32_t u; float f; } v;
    if (exponent == 0) {   /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        const float f = ldexpf((float)mantissa, -24);
        return sign ? -f : f;
    }
    v.u = sign | (exponent == 31 ? 0x7f800000u : (exponent + 112u) << 23) | (mantissa << 13);
    return v.f;
}

/* Round to nearest even, as torch rounds a float32 to float16: subnormals below 2^-14, infinity from
 * 65520 on, NaN stays a quiet NaN. */
static inline uint16_t float_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    union { float f; uint32_t u; } v = { .f = f };
    const uint32_t sign = (v.u >> 16) & 0x8000u, a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u)   /* |f| * 2^24 is exact; rounded half to even, 1024 is the smallest normal */
        return (uint16_t)(sign | (uint32_t)nearbyintf(fabsf(f) * 16777216.0f));
    return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10));
#endif
}

/* Round to nearest even, as torch rounds a float32 to bfloat16 (NaN stays a quiet NaN). */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = { .f = f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* A float32 value rounded to the row dtype and back: where torch stores a bf16 intermediate. */
static inline float round_to(int dtype, float f) {
    return dtype == BF16 ? bf16_to_float(float_to_bf16(f)) : f;
}

static inline void load_row(int dtype, const void *src, float *dst, int64_t n) {
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else if (dtype == F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_float(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void store_row(int dtype, const float *src, void *dst, int64_t n) {
    if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = float_to_bf16(src[i]);
    } else if (dtype == F16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = float_to_f16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline char *row_ptr(int dtype, const void *base, int64_t row, int64_t stride) {
    return (char *)base + row * stride * elem_size(dtype);
}

#endif
