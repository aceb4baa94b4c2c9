/* ondo's CPU kernels: the elementwise ops and the decode attention of a decoder layer, one call each.
 *
 * Why by hand: on a CPU a decode step of a small model is dominated by the number of tensor ops, not
 * their arithmetic (a 576-wide RMSNorm is 7 torch ops and ~25 us; here one call of ~1 us). Each function
 * rounds where the torch code of ondo/layers rounds (norm.py, rotary.py, activation.py), so a model gives
 * the same numbers with or without them, up to the order of float32 sums.
 *
 * Rows are bfloat16 (dtype 1) or float32 (dtype 0); arithmetic is float32. Compiled at first use by
 * ondo/layers/cpu_kernels/__init__.py: -march=native; -ffp-contract=off, so that a product and the sum
 * after it round apart as in torch. Decode attention shares its KV heads and keys among threads (as
 * int4_mm.c shares its rows); the others run on the calling thread.
 */
#include "common.h"
#include "kernels.h"

/* RMSNorm of each row, x = x + residual first when residual is given (the sum rounded to the dtype and
 * written to residual_out). offset == 0 (Llama, Qwen): round(round(x * rstd) * w), as F.rms_norm then
 * mul_(weight); offset != 0 (Gemma): round(x * rstd * (offset + w)) in float32. Strides in elements. */
void ondo_rms_norm(int dtype, const void *x, const void *residual, void *out, void *residual_out,
                   const void *weight, int weight_dtype, int64_t rows, int64_t n, int64_t x_stride,
                   int64_t residual_stride, int64_t out_stride, int64_t residual_out_stride, float eps,
                   float offset) {
    float *buf = malloc((size_t)(3 * n) * sizeof(float));
    float *xf = buf, *rf = buf + n, *w = buf + 2 * n;
    load_row(weight_dtype, weight, w, n);
    if (offset != 0.0f) {
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) w[i] = offset + w[i];
    }
    for (int64_t r = 0; r < rows; r++) {
        load_row(dtype, row_ptr(dtype, x, r, x_stride), xf, n);
        if (residual) {
            load_row(dtype, row_ptr(dtype, residual, r, residual_stride), rf, n);
            for (int64_t i = 0; i < n; i++) xf[i] = round_to(dtype, xf[i] + rf[i]);
            store_row(dtype, xf, row_ptr(dtype, residual_out, r, residual_out_stride), n);
        }
        float squares = 0.0f;
        #pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < n; i++) squares += xf[i] * xf[i];
        float rstd = 1.0f / sqrtf(squares / (float)n + eps);
        if (offset != 0.0f) {
            for (int64_t i = 0; i < n; i++) xf[i] = (xf[i] * rstd) * w[i];
        } else {
            for (int64_t i = 0; i < n; i++) xf[i] = round_to(dtype, xf[i] * rstd) * w[i];
        }
        store_row(dtype, xf, row_ptr(dtype, out, r, out_stride), n);
    }
    free(buf);
}

/* out = act(gate) * up for x = [gate | up] (each `inter` wide): silu, or gelu with the tanh
 * approximation (gelu_tanh != 0). The activation is rounded to the dtype before the product, as
 * act(gate).mul_(up) rounds it. A prefill's rows are shared by `threads` threads (on one thread its
 * exponentials were a tenth of a 32 x 128-token prefill, the other thread waiting). */
void ondo_gated(int dtype, int gelu_tanh, const void *x, void *out, int64_t rows, int64_t inter,
                int64_t x_stride, int64_t out_stride, int threads) {
    const float beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    #pragma omp parallel num_threads(threads) if (rows > 1)
    {
        float *buf = malloc((size_t)(2 * inter) * sizeof(float));
        float *gate = buf, *up = buf + inter;
        #pragma omp for
        for (int64_t r = 0; r < rows; r++) {
            const char *row = row_ptr(dtype, x, r, x_stride);
            load_row(dtype, row, gate, inter);
            load_row(dtype, row + inter * elem_size(dtype), up, inter);
            for (int64_t i = 0; i < inter; i++) {
                float g = gate[i];
                float act = gelu_tanh ? 0.5f * g * (1.0f + tanhf(beta * (g + kappa * g * g * g)))
                                      : g / (1.0f + expf(-g));
                gate[i] = round_to(dtype, act) * up[i];
            }
            store_row(dtype, gate, row_ptr(dtype, out, r, out_stride), inter);
        }
        free(buf);
    }
}

/* Rotary embedding in place, neox layout, from the tables of rotary.py's `rotation_tables`: for each
 * token t and head, the first 2 * half dims become round(x * cos) + round(swap(x) * signed_sin), swap
 * exchanging the two halves (signed_sin has its first half negated). x rows are `heads * head_dim` wide
 * with row stride x_stride; cos / signed_sin rows are 2 * half wide. */
void ondo_rotary(int dtype, void *x, int64_t tokens, int64_t x_stride, int64_t heads, int64_t head_dim,
                 int64_t half, const void *cos, const void *signed_sin, int64_t table_stride) {
    float *buf = malloc((size_t)(8 * half) * sizeof(float));
    float *c = buf, *s = buf + 2 * half, *h = buf + 4 * half, *rotated = buf + 6 * half;
    for (int64_t t = 0; t < tokens; t++) {
        load_row(dtype, row_ptr(dtype, cos, t, table_stride), c, 2 * half);
        load_row(dtype, row_ptr(dtype, signed_sin, t, table_stride), s, 2 * half);
        char *row = row_ptr(dtype, x, t, x_stride);
        for (int64_t head = 0; head < heads; head++) {
            char *hp = row + head * head_dim * elem_size(dtype);
            load_row(dtype, hp, h, 2 * half);
            for (int64_t i = 0; i < 2 * half; i++) {
                float swapped = h[i < half ? i + half : i - half];
                rotated[i] = round_to(dtype, h[i] * c[i]) + round_to(dtype, swapped * s[i]);
            }
            store_row(dtype, rotated, hp, 2 * half);
        }
    }
    free(buf);
}

/* Keys and values of `tokens` new tokens into their cache slots. The cache is [2, slots, width]
 * (K then V; width = kv_heads * head_dim) of cache_dtype, the k / v rows of dtype with strides in
 * elements (rounded to the cache's float16 or bfloat16 as torch's .to() rounds them). A slot of -1 (a
 * padding row) is skipped, as the GPU's KV write skips it. */
void ondo_write_kv(int dtype, int cache_dtype, void *cache, int64_t num_slots, const void *k, const void *v,
                   int64_t tokens, int64_t width, int64_t k_stride, int64_t v_stride, const int64_t *slots) {
    char *values = row_ptr(cache_dtype, cache, num_slots, width);
    float *row = dtype == cache_dtype ? NULL : malloc((size_t)width * sizeof(float));
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        const char *from[2] = {row_ptr(dtype, k, t, k_stride), row_ptr(dtype, v, t, v_stride)};
        char *to[2] = {row_ptr(cache_dtype, cache, slots[t], width), row_ptr(cache_dtype, values, slots[t], width)};
        for (int i = 0; i < 2; i++) {
            if (row == NULL) {
                memcpy(to[i], from[i], (size_t)(width * elem_size(dtype)));
            } else {
                load_row(dtype, from[i], row, width);
                store_row(cache_dtype, row, to[i], width);
            }
        }
    }
    free(row);
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 load8(int dtype, const char *p) {   /* 8 elements as float32 */
    if (dtype == BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    if (dtype == F16) {
#if defined(__F16C__)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
        float f[8];
        load_row(F16, p, f, 8);
        return _mm256_loadu_ps(f);
#endif
    }
    return _mm256_loadu_ps((const float *)p);
}
#endif

/* q . key over n elements, the key as stored (float32, bfloat16 or float16, converted exactly as it is read). With
 * AVX2, two chains of fused multiply-adds and one horizontal sum: the plain loop's single chain and its
 * sum through memory made a 64-wide dot ~50 cycles. */
static inline float dot(int dtype, const float *q, const char *key, int64_t n) {
    const int64_t elem = elem_size(dtype);
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(dtype, key + i * elem), even);
        odd = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(dtype, key + (i + 8) * elem), odd);
    }
    for (; i + 8 <= n; i += 8) even = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(dtype, key + i * elem), even);
    __m256 v = _mm256_add_ps(even, odd);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    if (i < n) {
        float rest[n - i];
        load_row(dtype, key + i * elem, rest, n - i);
        for (int64_t j = 0; i + j < n; j++) sum += q[i + j] * rest[j];
    }
    return sum;
}

/* out[d] = sum_i p[i] * v_i[d] over the value rows at element offsets rows[i], added to out[d] when
 * `add` (the sums go on in the same order). With AVX2 each 64-wide chunk of out stays in eight registers
 * over all the rows. */
static void weigh_values(int dtype, const char *values, const int64_t *rows, int64_t count, const float *p,
                         int64_t head_dim, float *out, int add) {
    const int64_t elem = elem_size(dtype);
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; c + 64 <= head_dim; c += 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        if (add) {
            a0 = _mm256_loadu_ps(out + c), a1 = _mm256_loadu_ps(out + c + 8), a2 = _mm256_loadu_ps(out + c + 16);
            a3 = _mm256_loadu_ps(out + c + 24), a4 = _mm256_loadu_ps(out + c + 32), a5 = _mm256_loadu_ps(out + c + 40);
            a6 = _mm256_loadu_ps(out + c + 48), a7 = _mm256_loadu_ps(out + c + 56);
        }
        for (int64_t i = 0; i < count; i++) {
            const __m256 w = _mm256_set1_ps(p[i]);
            const char *v = values + (rows[i] + c) * elem;
            a0 = _mm256_fmadd_ps(w, load8(dtype, v), a0);
            a1 = _mm256_fmadd_ps(w, load8(dtype, v + 8 * elem), a1);
            a2 = _mm256_fmadd_ps(w, load8(dtype, v + 16 * elem), a2);
            a3 = _mm256_fmadd_ps(w, load8(dtype, v + 24 * elem), a3);
            a4 = _mm256_fmadd_ps(w, load8(dtype, v + 32 * elem), a4);
            a5 = _mm256_fmadd_ps(w, load8(dtype, v + 40 * elem), a5);
            a6 = _mm256_fmadd_ps(w, load8(dtype, v + 48 * elem), a6);
            a7 = _mm256_fmadd_ps(w, load8(dtype, v + 56 * elem), a7);
        }
        _mm256_storeu_ps(out + c, a0);
        _mm256_storeu_ps(out + c + 8, a1);
        _mm256_storeu_ps(out + c + 16, a2);
        _mm256_storeu_ps(out + c + 24, a3);
        _mm256_storeu_ps(out + c + 32, a4);
        _mm256_storeu_ps(out + c + 40, a5);
        _mm256_storeu_ps(out + c + 48, a6);
        _mm256_storeu_ps(out + c + 56, a7);
    }
#endif
    if (c < head_dim) {
        float row[head_dim - c];
        if (!add) memset(out + c, 0, (size_t)(head_dim - c) * sizeof(float));
        for (int64_t i = 0; i < count; i++) {
            load_row(dtype, values + (rows[i] + c) * elem, row, head_dim - c);
            #pragma omp simd
            for (int64_t d = 0; d < head_dim - c; d++) out[c + d] += p[i] * row[d];
        }
    }
}

#if defined(__AVX512F__)
enum { MAX_GROUP = 8 };   /* query heads a KV head serves, taken together below (GQA); more: head by head */

static inline __m512 load16(int dtype, const char *p) {   /* 16 elements as float32 */
    if (dtype == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    if (dtype == F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_loadu_ps((const float *)p);
}

/* p[g * most + i] = scale * (q_g . key_i) for the G query heads of one KV head: each key converted once
 * for all of them, 16 elements at a time (head_dim a multiple of 16). */
static inline __attribute__((always_inline)) void group_scores(int dtype, const int G, const float *qh,
        int64_t head_dim, const char *key_base, const int64_t *rows, int64_t n, float scale, float *p,
        int64_t most) {
    const int64_t elem = elem_size(dtype);
    for (int64_t i = 0; i < n; i++) {
        const char *key = key_base + rows[i] * elem;
        __m512 sum[MAX_GROUP];
        for (int g = 0; g < G; g++) sum[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < head_dim; c += 16) {
            const __m512 k = load16(dtype, key + c * elem);
            for (int g = 0; g < G; g++) sum[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + g * head_dim + c), k, sum[g]);
        }
        for (int g = 0; g < G; g++) p[g * most + i] = _mm512_reduce_add_ps(sum[g]) * scale;
    }
}

/* out_g[d] (+)= sum_i p_g[i] * v_i[d] for the G query heads of one KV head, as weigh_values does head
 * by head (the same multiply-adds in the same order), each value row converted once for all of them:
 * CH chunks of 16 elements at a time, G * CH sums in registers. */
static inline __attribute__((always_inline)) void group_values_chunks(int dtype, const int G, const int CH,
        const char *values, const int64_t *rows, int64_t count, const float *p, int64_t most, int64_t head_dim,
        int64_t c, float *out, int add) {
    const int64_t elem = elem_size(dtype);
    __m512 sum[MAX_GROUP][4];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < CH; j++)
            sum[g][j] = add ? _mm512_loadu_ps(out + g * head_dim + c + 16 * j) : _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i++) {
        const char *v = values + (rows[i] + c) * elem;
        __m512 value[4];
        for (int j = 0; j < CH; j++) value[j] = load16(dtype, v + 16 * j * elem);
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[g * most + i]);
            for (int j = 0; j < CH; j++) sum[g][j] = _mm512_fmadd_ps(w, value[j], sum[g][j]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < CH; j++) _mm512_storeu_ps(out + g * head_dim + c + 16 * j, sum[g][j]);
}

static inline __attribute__((always_inline)) void group_values(int dtype, const int G, const char *values,
        const int64_t *rows, int64_t count, const float *p, int64_t most, int64_t head_dim, float *out, int add) {
    int64_t c = 0;
    if (G <= 4)   /* 4 chunks x G heads: at most 16 sums */
        for (; c + 64 <= head_dim; c += 64) group_values_chunks(dtype, G, 4, values, rows, count, p, most, head_dim, c, out, add);
    for (; c < head_dim; c += 16) group_values_chunks(dtype, G, 1, values, rows, count, p, most, head_dim, c, out, add);
}
#endif

/* The scores of one (sequence, KV head, part) item: p[g * most + i] for its G query heads and n keys. */
static void item_scores(int dtype, int64_t group, const float *qh, int64_t head_dim, const char *key_base,
                        const int64_t *rows, int64_t n, float scale, float *p, int64_t most) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && group <= MAX_GROUP) {
        switch (group) {   /* a constant group: the sums stay in registers */
#define GROUP(G) case G: group_scores(dtype, G, qh, head_dim, key_base, rows, n, scale, p, most); return;
            GROUP(1) GROUP(2) GROUP(3) GROUP(4) GROUP(5) GROUP(6) GROUP(7) GROUP(8)
#undef GROUP
        }
    }
#endif
    const int64_t elem = elem_size(dtype);
    for (int64_t i = 0; i < n; i++)      /* a key, then its dot with each query head (from L1) */
        for (int64_t g = 0; g < group; g++)
            p[g * most + i] = dot(dtype, qh + g * head_dim, key_base + rows[i] * elem, head_dim) * scale;
}

/* acc_g (+)= the values of `count` rows weighed by p_g, for the item's G query heads. */
static void item_values(int dtype, int64_t group, const char *value_base, const int64_t *rows, int64_t count,
                        const float *p, int64_t most, int64_t head_dim, float *acc, int add) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && group <= MAX_GROUP) {
        switch (group) {
#define GROUP(G) case G: group_values(dtype, G, value_base, rows, count, p, most, head_dim, acc, add); return;
            GROUP(1) GROUP(2) GROUP(3) GROUP(4) GROUP(5) GROUP(6) GROUP(7) GROUP(8)
#undef GROUP
        }
    }
#endif
    for (int64_t g = 0; g < group; g++)
        weigh_values(dtype, value_base, rows, count, p + g * most, head_dim, acc + g * head_dim, add);
}

/* Decode attention: one query per sequence against the sequence's cached keys in the paged cache
 * [2, blocks, block_size, kv_heads, head_dim], read in place through its block table. GQA: query head
 * kv_head * group + g reads kv_head. Keys from seq_len - window on with a sliding window (window > 0);
 * scores soft-capped when softcap > 0. Scores, softmax and the weighted sum of values in float32, rounded
 * once to the dtype at the end.
 *
 * Work items are (sequence, KV head, part of the keys): the `group` query heads of a KV head go
 * together, head after head over each block of keys and values while it is in L1, so each key and value
 * comes from memory once, not once a query head (at 1,500 tokens of the built-in model the cache read by
 * every layer outgrew the caches and attention took a third of a decode step). Where the (sequence, KV
 * head) pairs are fewer than two per thread, a sequence's keys are split in parts of at least
 * MIN_PART_KEYS, each part's softmax kept unnormalised with its maximum and sum, and the parts merged:
 * out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p. With one part the numbers are those of a
 * plain softmax: p normalised, then the values weighed. Threads share the items; a head's numbers do not
 * depend on which thread computes them. */
enum { MIN_PART_KEYS = 64, KEY_BLOCK = 32 };

void ondo_decode_attention(int dtype, int cache_dtype, const void *q, int64_t q_stride, void *out,
                           int64_t out_stride, const void *cache, int64_t num_slots, const int32_t *block_tables,
                           int64_t table_stride, const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                           int64_t window, float softcap, int threads) {
    const int64_t group = num_heads / num_kv_heads, width = num_kv_heads * head_dim;
    const int64_t elem = elem_size(dtype), cache_elem = elem_size(cache_dtype);
    const char *keys = (const char *)cache, *values = keys + num_slots * width * cache_elem;
    /* each visible token's row (element offset) in either half of the cache, sequence after sequence */
    int64_t *starts = malloc((size_t)(num_seqs + 1) * sizeof(int64_t)), longest = 0;
    starts[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t len = seq_lens[s], first = window > 0 && len > window ? len - window : 0;
        starts[s + 1] = starts[s] + len - first;
        if (len - first > longest) longest = len - first;
    }
    int64_t *rows = malloc((size_t)(starts[num_seqs] > 0 ? starts[num_seqs] : 1) * sizeof(int64_t));
    for (int64_t s = 0; s < num_seqs; s++) {
        const int32_t *table = block_tables + s * table_stride;
        const int64_t first = seq_lens[s] - (starts[s + 1] - starts[s]);
        for (int64_t t = first; t < seq_lens[s]; t++)
            rows[starts[s] + t - first] = ((int64_t)table[t / block_size] * block_size + t % block_size) * width;
    }
    const int64_t pairs = num_seqs * num_kv_heads;
    const int64_t most_parts = longest / MIN_PART_KEYS > 1 ? longest / MIN_PART_KEYS : 1;
    int64_t parts = pairs < 2 * threads ? (2 * threads + pairs - 1) / pairs : 1;
    if (parts > most_parts) parts = most_parts;
    /* parts > 1: each (sequence, head, part)'s maximum, sum and unnormalised weighted values */
    const int64_t stride = head_dim + 2;
    float *partial = parts > 1 ? malloc((size_t)(num_seqs * num_heads * parts * stride) * sizeof(float)) : NULL;
    #pragma omp parallel num_threads(threads)
    {
        const int64_t most = (longest + parts - 1) / parts;   /* keys of the longest part */
        float *scratch = malloc((size_t)(group * (most + 2 * head_dim)) * sizeof(float));
        float *qh = scratch, *acc = qh + group * head_dim, *p = acc + group * head_dim;   /* p: [group][most] */
        #pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < pairs * parts; item++) {
            const int64_t s = item / (num_kv_heads * parts), kvh = item / parts % num_kv_heads, part = item % parts;
            const int64_t count = starts[s + 1] - starts[s];
            const int64_t lo = count * part / parts, n = count * (part + 1) / parts - lo;
            const int64_t *part_rows = rows + starts[s] + lo;
            const char *key_base = keys + kvh * head_dim * cache_elem;
            const char *value_base = values + kvh * head_dim * cache_elem;
            for (int64_t g = 0; g < group; g++)
                load_row(dtype, row_ptr(dtype, q, s, q_stride) + (kvh * group + g) * head_dim * elem,
                         qh + g * head_dim, head_dim);
            item_scores(cache_dtype, group, qh, head_dim, key_base, part_rows, n, scale, p, most);
            for (int64_t g = 0; g < group; g++) {
                float *pg = p + g * most, top = -INFINITY, total = 0.0f;
                if (softcap > 0.0f) {
                    for (int64_t i = 0; i < n; i++) pg[i] = softcap * tanhf(pg[i] / softcap);
                }
                #pragma omp simd reduction(max : top)
                for (int64_t i = 0; i < n; i++) top = pg[i] > top ? pg[i] : top;
                #pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < n; i++) {
                    pg[i] = expf(pg[i] - top);
                    total += pg[i];
                }
                if (parts == 1) {
                    const float inverse = 1.0f / total;
                    #pragma omp simd
                    for (int64_t i = 0; i < n; i++) pg[i] *= inverse;
                } else {
                    float *keep = partial + ((s * num_heads + kvh * group + g) * parts + part) * stride;
                    keep[0] = top;
                    keep[1] = total;
                }
            }
            if (n == 0) memset(acc, 0, (size_t)(group * head_dim) * sizeof(float));
            for (int64_t b = 0; b < n; b += KEY_BLOCK)   /* a block of values, then each head's share */
                item_values(cache_dtype, group, value_base, part_rows + b, n - b < KEY_BLOCK ? n - b : KEY_BLOCK,
                            p + b, most, head_dim, acc, b > 0);
            for (int64_t g = 0; g < group; g++) {
                const int64_t head = kvh * group + g;
                if (parts == 1)
                    store_row(dtype, acc + g * head_dim, row_ptr(dtype, out, s, out_stride) + head * head_dim * elem,
                              head_dim);
                else
                    memcpy(partial + ((s * num_heads + head) * parts + part) * stride + 2, acc + g * head_dim,
                           (size_t)head_dim * sizeof(float));
            }
        }
        if (parts > 1) {
            #pragma omp for
            for (int64_t sh = 0; sh < num_seqs * num_heads; sh++) {
                const float *kept = partial + sh * parts * stride;
                float top = -INFINITY, total = 0.0f;
                for (int64_t k = 0; k < parts; k++) top = kept[k * stride] > top ? kept[k * stride] : top;
                memset(acc, 0, (size_t)head_dim * sizeof(float));
                for (int64_t k = 0; k < parts; k++) {
                    if (kept[k * stride + 1] == 0.0f) continue;   /* a part without keys */
                    const float w = expf(kept[k * stride] - top);
                    total += w * kept[k * stride + 1];
                    #pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) acc[d] += w * kept[k * stride + 2 + d];
                }
                const float inverse = 1.0f / total;
                #pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) acc[d] *= inverse;
                const int64_t s = sh / num_heads, head = sh % num_heads;
                store_row(dtype, acc, row_ptr(dtype, out, s, out_stride) + head * head_dim * elem, head_dim);
            }
        }
        free(scratch);
    }
    free(partial);
    free(rows);
    free(starts);
}
