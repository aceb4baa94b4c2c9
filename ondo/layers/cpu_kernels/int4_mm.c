/* The product of a few activation rows with int4 planes (ondo/layers/quantization/int4_planes.py), read
 * in torch's CPU int4 tile layout as it is stored: the decode-sized batches of a packed model on the CPU.
 *
 * Why by hand: torch's kernel (aten._weight_int4pack_mm_for_cpu) is vectorized for bfloat16 only (10 to
 * 60 times slower in float32), and the decode stack (decoder_stack.c) needs a product it can call from C.
 * In bfloat16 the two are within 15 % of each other on 1 to 128 rows. A group's scale and zero apply once
 * per row and group:
 *     sum_k x_k w_k = scale * sum_k x_k code_k + (zero - 8 scale) * sum_k x_k    (w = (code - 8) scale + zero)
 * and sum_k x_k code_k is taken with integers where the CPU has AVX512 byte permutes or AVX2 without
 * AVX512 (ROUNDED_X below: x rounded to 16 bits per group, two inputs per multiply-add), else with floats
 * (each code times x is exact in float32, one multiply-add per weight). Sums are float32, rounded once at
 * the end.
 *
 * Layout (int4_planes.pack_tiles): tiles of T rows (32 with AVX2, 64 with AVX512); byte [tile, k, d]
 * holds row d's code in its low nibble and row d + T/2's in its high one. 16 consecutive bytes of one k
 * hold 32 rows, a "unit" here: its codes are 16 low and 16 high nibbles, 4 vectors of 8 floats.
 * scales_and_zeros [P * G, N_pad, 2]. A model with P planes multiplies [x, x, ...]: x is read P times,
 * except where two planes are one code's digits (ondo_int4_weight.digits), taken together.
 */
#include "int4_mm.h"

enum { UNIT = 32 };            /* rows per unit: 16 bytes of codes at each k */
enum { MAX_TILE = 64 };        /* torch's tiles: 32 rows (AVX2) or 64 (AVX512), one or two units */
/* Rounded activations (AVX512 with byte permutes, and AVX2): each row's inputs of a group are rounded to 16-bit
 * integers, x ~ q dx with dx = max |x| / 32767 over the group, and a group's codes meet them as integers,
 * two inputs per multiply-add (vpdpwssd) instead of one float each. The product is then the exact one of
 * the rounded inputs up to float32 sums: |x - q dx| <= dx / 2, some 1.5e-5 of the group's largest input,
 * below a bfloat16 activation's own rounding (the built-in model's perplexity moved by +0.0005 %). */
#if defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define ROUNDED_X 1
#define ROUNDED_X_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* AVX2: a byte shuffle and unpack where AVX512 permutes, 16 inputs per multiply-add (vpmaddwd), the same
 * values (docs/architecture.md has the measurements). AVX512 CPUs without byte permutes keep floats (not
 * measured). */
#define ROUNDED_X 1
#define ROUNDED_X_AVX512 0
#else
#define ROUNDED_X 0
#endif
/* Activation rows sharing one decode of the codes: as many as their sums leave registers for (AVX512 has 32;
 * AVX2 16, 4 sums of a unit per row: 3 rows spill them, and ran no faster on 32 rows of a 2-core Zen 3). */
#if defined(__AVX512F__)
#define ROWS_PER_PASS 6
#else
#define ROWS_PER_PASS 2
#endif
/* AVX2 with rounded activations: a group's codes are decoded to words once (group_words) for the passes of
 * a block of up to BLOCK_ROWS rows, which then only load them. Elsewhere a block is one pass. */
#if ROUNDED_X && !ROUNDED_X_AVX512
#define SHARED_WORDS 1
enum { BLOCK_ROWS = 32 };
#else
#define SHARED_WORDS 0
enum { BLOCK_ROWS = ROWS_PER_PASS };
#endif
/* AVX2 with rounded activations: a layer whose two planes are one code's digits may keep its codes as whole
 * bytes instead (int4_planes.to_code_bytes, tiles of 32 rows), a row's bytes of k and k + 1 side by side, so
 * that one widening load gives 8 rows' words (byte_group_sums): the digit planes take two loads, two
 * permutes, two shuffles and a dozen masks, shifts and ors for the same words. */
#define CODE_BYTES SHARED_WORDS
int ondo_int4_reads_code_bytes(void) { return CODE_BYTES; }
/* There too, other layers' 32-row tiles may keep their bytes in the order row_pairs() would put them in
 * (ROW_PAIRS: int4_planes.to_row_pairs): a pair of k's 32 bytes as rows 0-15's (byte of k, byte of k + 1),
 * so one load replaces a load, a 64-bit permute and a byte shuffle (a decode step of the built-in model
 * 12.3-12.8 -> 11.4-12.0 ms, median of 8, alternating layouts in one process on a 2-core Zen 3). */

/* What a product reads of its activations: float32 rows, or the rounded ones with their group scales. */
typedef struct {
    const float *xf;      /* [rows][k_in] */
    const int16_t *xq;    /* [rows][k_in] (ROUNDED_X) */
    const float *dx;      /* [rows][groups] (ROUNDED_X) */
    const float *xsum;    /* [rows][groups]: the sum of each group's inputs (of q dx with ROUNDED_X) */
} activations;

int ondo_int4_rounds_activations(void) { return ROUNDED_X; }

/* The scale and zero - 8 scale of a unit's 32 rows for one group, as float32. The unit's low and high
 * halves are 16 consecutive rows each, whose (scale, zero) pairs (or (scale, zero - 8 scale): F16_MIN) are
 * adjacent in `sz` from `first_lo` and `first_hi` (element offsets of each half's first pair). */
static inline __attribute__((always_inline)) void unit_scales(const void *sz, int sz_dtype, int64_t first_lo, int64_t first_hi, float *scale,
                        float *zero) {
    for (int half = 0; half < 2; half++) {
        const int64_t first = half ? first_hi : first_lo;
        float *s = scale + half * 16, *z = zero + half * 16;
        int i = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        const __m256 eight = _mm256_set1_ps(8.0f);
        for (; i < 16; i += 8) {
            __m256 sv, zv;
            if (sz_dtype == BF16) {   /* 8 pairs = 8 words: scale in the low half, zero in the high one */
                const __m256i pairs = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + first + 2 * i));
                sv = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
                zv = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u)));
            } else {                  /* 8 pairs of floats (or halves): even lanes the scales, odd ones the zeros */
                __m256 a, b;
                if (sz_dtype == F16_MIN) {
                    const uint16_t *p = (const uint16_t *)sz + first + 2 * i;
                    a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
                    b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
                } else {
                    const float *p = (const float *)sz + first + 2 * i;
                    a = _mm256_loadu_ps(p);
                    b = _mm256_loadu_ps(p + 8);
                }
                const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
                sv = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, 0x88), order);
                zv = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, 0xdd), order);
            }
            _mm256_storeu_ps(s + i, sv);
            _mm256_storeu_ps(z + i, sz_dtype == F16_MIN ? zv : _mm256_fnmadd_ps(eight, sv, zv));
        }
#endif
        for (; i < 16; i++) {
            const int64_t at = first + 2 * i;
            if (sz_dtype == F16_MIN) {
                s[i] = f16_to_float(((const uint16_t *)sz)[at]);
                z[i] = f16_to_float(((const uint16_t *)sz)[at + 1]);
                continue;
            }
            s[i] = sz_dtype == BF16 ? bf16_to_float(((const uint16_t *)sz)[at]) : ((const float *)sz)[at];
            z[i] = (sz_dtype == BF16 ? bf16_to_float(((const uint16_t *)sz)[at + 1]) : ((const float *)sz)[at + 1])
                   - 8.0f * s[i];
        }
    }
}

/* sums[m][j] = sum over the group's k of x[m][k] * code_j[k], for the tile's rows in unit order (unit c:
 * positions 32 c + i, i < 32). `codes` points at the group's first k; consecutive k are `k_step` bytes
 * apart. `units` (1 or 2) is a constant where this is inlined, so the sums stay in registers. */
static inline __attribute__((always_inline)) void group_sums(const uint8_t *codes, int64_t k_step, int64_t group,
                                                             const float *const *x, const int rows, const int units,
                                                             float sums[ROWS_PER_PASS][MAX_TILE]) {
#if defined(__AVX512F__)
    /* 16 bytes widened to 16 words, each byte = low | high << 4: one mask and one shift give 16 rows each. */
    const __m512i low_nibbles = _mm512_set1_epi32(15);
    __m512 s[ROWS_PER_PASS][2 * 2];
    for (int m = 0; m < ROWS_PER_PASS; m++)
        for (int j = 0; j < 2 * units; j++) s[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k++) {
        for (int c = 0; c < units; c++) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + k * k_step + c * 16)));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low_nibbles));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            for (int m = 0; m < rows; m++) {
                const __m512 xk = _mm512_set1_ps(x[m][k]);
                s[m][2 * c] = _mm512_fmadd_ps(lo, xk, s[m][2 * c]);
                s[m][2 * c + 1] = _mm512_fmadd_ps(hi, xk, s[m][2 * c + 1]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 2 * units; j++) _mm512_storeu_ps(sums[m] + 16 * j, s[m][j]);
#elif defined(__AVX2__) && defined(__FMA__)
    /* 8 bytes widened to 8 words at a time, each byte = low | high << 4, as above. */
    const __m256i low_nibbles = _mm256_set1_epi32(15);
    __m256 s[ROWS_PER_PASS][2 * 4];
    for (int m = 0; m < ROWS_PER_PASS; m++)
        for (int j = 0; j < 4 * units; j++) s[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < group; k++) {
        for (int c = 0; c < units; c++) {
            const uint8_t *b = codes + k * k_step + c * 16;
            const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
            const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)));
            const __m256 w[4] = {   /* rows 0-7 and 8-15 of the low nibbles, then of the high ones */
                _mm256_cvtepi32_ps(_mm256_and_si256(v0, low_nibbles)),
                _mm256_cvtepi32_ps(_mm256_and_si256(v1, low_nibbles)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)),
            };
            for (int m = 0; m < rows; m++) {
                const __m256 xk = _mm256_set1_ps(x[m][k]);
                for (int j = 0; j < 4; j++) s[m][4 * c + j] = _mm256_fmadd_ps(w[j], xk, s[m][4 * c + j]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4 * units; j++) _mm256_storeu_ps(sums[m] + 8 * j, s[m][j]);
#else
    for (int m = 0; m < rows; m++) memset(sums[m], 0, sizeof(float) * MAX_TILE);
    for (int64_t k = 0; k < group; k++) {
        for (int c = 0; c < units; c++) {
            const uint8_t *b = codes + k * k_step + c * 16;
            for (int m = 0; m < rows; m++) {
                const float xk = x[m][k];
                for (int i = 0; i < UNIT / 2; i++) {
                    sums[m][UNIT * c + i] += (float)(b[i] & 15) * xk;
                    sums[m][UNIT * c + i + UNIT / 2] += (float)(b[i] >> 4) * xk;
                }
            }
        }
    }
#endif
}

#if ROUNDED_X_AVX512
/* group_sums on rounded activations: sums[m][j] = dx[m] * sum over the group's k of q[m][k] * code_j[k].
 * `codes` points at the tile's bytes for the group's first k (k_step = 16 tile_units bytes apart); the
 * products are those of units c0 .. c0 + units - 1. For k and k + 1, a byte permute gives lane r of a unit
 * the words (byte of k, 0) and (byte of k + 1, 0): the low nibbles are row r's codes, bits 4-7 row r + 16's.
 * `digits`: the two planes of one 5- to 8-bit code (int4_planes._planes, code = low + 16 high digit; `high`
 * the second plane's bytes of the group): each word then takes the whole code, so one multiply-add counts
 * both digits. */
static inline __attribute__((always_inline)) void rounded_group_sums(const uint8_t *codes, const uint8_t *high,
        int64_t group, const int16_t *const *q, const float *dx, const int rows, const int tile_units, int c0,
        const int units, const int digits, float sums[ROWS_PER_PASS][MAX_TILE]) {
    const __m512i nibble = _mm512_set1_epi16(15);
    const __m512i from_first = _mm512_set1_epi16((short)0xff0f);   /* word bits taken from ternlog's first operand */
    const __mmask64 even_bytes = 0x5555555555555555ull;              /* the words' high bytes are zeroed */
    for (int c = 0; c < units; c++) {   /* one unit at a time: 2 sums per row stay in registers */
        uint8_t order[64] = {0};   /* tile_units 2: [k unit 0 | k unit 1 | k+1 unit 0 | k+1 unit 1]; 1: [k | k+1] */
        const int at_k = 16 * (c0 + c), at_next = 16 * tile_units + 16 * (c0 + c);
        for (int r = 0; r < 16; r++) {
            order[4 * r] = (uint8_t)(at_k + r);
            order[4 * r + 2] = (uint8_t)(at_next + r);
        }
        const __m512i pick = _mm512_loadu_si512(order);
        __m512i lo_sum[ROWS_PER_PASS], hi_sum[ROWS_PER_PASS];
        for (int m = 0; m < rows; m++) lo_sum[m] = hi_sum[m] = _mm512_setzero_si512();
        for (int64_t k = 0; k < group; k += 2) {
            const uint8_t *b = codes + k * 16 * tile_units;
            const __m512i bytes = tile_units == 2 ? _mm512_loadu_si512(b)
                                                  : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)b));
            const __m512i words = _mm512_maskz_permutexvar_epi8(even_bytes, pick, bytes);
            __m512i lo, hi;
            if (digits) {   /* ternlog 0xE4: bits of from_first from the first operand, the rest from the second */
                const uint8_t *h = high + k * 16 * tile_units;
                const __m512i high_bytes =
                    tile_units == 2 ? _mm512_loadu_si512(h) : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)h));
                const __m512i upper = _mm512_maskz_permutexvar_epi8(even_bytes, pick, high_bytes);
                lo = _mm512_ternarylogic_epi32(words, _mm512_slli_epi16(upper, 4), from_first, 0xE4);
                hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), upper, from_first, 0xE4);
            } else {
                lo = _mm512_and_si512(words, nibble);
                hi = _mm512_srli_epi16(words, 4);
            }
            for (int m = 0; m < rows; m++) {
                int32_t pair;
                memcpy(&pair, q[m] + k, sizeof(pair));   /* q[k] in the low word, as the codes of k */
                const __m512i xk = _mm512_set1_epi32(pair);
#if defined(__AVX512VNNI__)
                lo_sum[m] = _mm512_dpwssd_epi32(lo_sum[m], lo, xk);
                hi_sum[m] = _mm512_dpwssd_epi32(hi_sum[m], hi, xk);
#else
                lo_sum[m] = _mm512_add_epi32(lo_sum[m], _mm512_madd_epi16(lo, xk));
                hi_sum[m] = _mm512_add_epi32(hi_sum[m], _mm512_madd_epi16(hi, xk));
#endif
            }
        }
        /* |sum| <= 255 * 32767 * 256 < 2^31; as a float32 exact for 4-bit codes in groups of 32 */
        for (int m = 0; m < rows; m++) {
            const __m512 scale = _mm512_set1_ps(dx[m]);
            _mm512_storeu_ps(sums[m] + UNIT * c, _mm512_mul_ps(_mm512_cvtepi32_ps(lo_sum[m]), scale));
            _mm512_storeu_ps(sums[m] + UNIT * c + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi_sum[m]), scale));
        }
    }
}
#elif ROUNDED_X
/* The same sums with AVX2. unit_words decodes one unit's codes at k and k + 1 into 4 vectors of words,
 * each 32-bit lane one row's (code at k, code at k + 1): the 16 bytes of k and of k + 1 in one load, a
 * 64-bit permute (the one lane-crossing op) and a byte shuffle interleave them by row, a byte unpack with
 * zero widens them; a mask and a shift then split each byte's two rows (r and r + 16). Lanes hold rows
 * 0-3 | 8-11, 4-7 | 12-15, 16-19 | 24-27, 20-23 | 28-31 (put in order once a group). Against two
 * widening conversions a step (vpmovzxbw, lane-crossing), together with group_words' sharing: 32 rows
 * 15-35 % faster, one row the same (a 2-core Zen 3). */
static inline __attribute__((always_inline)) __m256i row_pairs(const uint8_t *b, int64_t k_step, const int stored) {
    if (stored) return _mm256_loadu_si256((const __m256i *)b);   /* ROW_PAIRS: already in this order */
    const __m256i both = k_step == 16 ? _mm256_loadu_si256((const __m256i *)b)
        : _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b)),
                                  _mm_loadu_si128((const __m128i *)(b + k_step)), 1);
    const __m256i by_row = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                            0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(both, 0xd8), by_row);   /* rows 0-7 | rows 8-15 */
}

static inline __attribute__((always_inline)) void unit_words(const uint8_t *codes, const uint8_t *high, int64_t at,
                                                             int64_t k_step, const int digits, const int paired,
                                                             __m256i v[4]) {
    const __m256i nibble = _mm256_set1_epi16(15), upper = _mm256_set1_epi16(0xf0), zero = _mm256_setzero_si256();
    const __m256i pairs = row_pairs(codes + at, k_step, paired);
    const __m256i w0 = _mm256_unpacklo_epi8(pairs, zero), w1 = _mm256_unpackhi_epi8(pairs, zero);
    if (digits) {   /* each word the whole code: low digit | high digit << 4 */
        const __m256i high_pairs = row_pairs(high + at, k_step, paired);
        const __m256i h0 = _mm256_unpacklo_epi8(high_pairs, zero), h1 = _mm256_unpackhi_epi8(high_pairs, zero);
        v[0] = _mm256_or_si256(_mm256_and_si256(w0, nibble), _mm256_and_si256(_mm256_slli_epi16(h0, 4), upper));
        v[1] = _mm256_or_si256(_mm256_and_si256(w1, nibble), _mm256_and_si256(_mm256_slli_epi16(h1, 4), upper));
        v[2] = _mm256_or_si256(_mm256_srli_epi16(w0, 4), _mm256_and_si256(h0, upper));
        v[3] = _mm256_or_si256(_mm256_srli_epi16(w1, 4), _mm256_and_si256(h1, upper));
    } else {
        v[0] = _mm256_and_si256(w0, nibble);
        v[1] = _mm256_and_si256(w1, nibble);
        v[2] = _mm256_srli_epi16(w0, 4);
        v[3] = _mm256_srli_epi16(w1, 4);
    }
}

/* Every step's words of a group's units, for the passes of a block of rows to share (`words`:
 * [units][group / 2][4]). */
static inline __attribute__((always_inline)) void group_words(const uint8_t *codes, const uint8_t *high, int64_t group,
        const int tile_units, int c0, const int units, const int digits, const int paired, __m256i *words) {
    for (int c = 0; c < units; c++)
        for (int64_t k = 0; k < group; k += 2)
            unit_words(codes, high, k * 16 * tile_units + 16 * (c0 + c), 16 * tile_units, digits, paired,
                       words + (c * group / 2 + k / 2) * 4);
}

/* `words`: group_words' of this group, or NULL to decode them here. */
static inline __attribute__((always_inline)) void rounded_group_sums(const uint8_t *codes, const uint8_t *high,
        int64_t group, const int16_t *const *q, const float *dx, const int rows, const int tile_units, int c0,
        const int units, const int digits, const int paired, const __m256i *words,
        float sums[ROWS_PER_PASS][MAX_TILE]) {
    for (int c = 0; c < units; c++) {
        __m256i s[ROWS_PER_PASS][4];   /* in unit_words' lane order */
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < 4; j++) s[m][j] = _mm256_setzero_si256();
        for (int64_t k = 0; k < group; k += 2) {
            __m256i v[4];
            if (words) {
                for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_si256(words + (c * group / 2 + k / 2) * 4 + j);
            } else {
                unit_words(codes, high, k * 16 * tile_units + 16 * (c0 + c), 16 * tile_units, digits, paired, v);
            }
            for (int m = 0; m < rows; m++) {
                int32_t pair;
                memcpy(&pair, q[m] + k, sizeof(pair));   /* q[k] in the low word, as the codes of k */
                const __m256i xk = _mm256_set1_epi32(pair);
                for (int j = 0; j < 4; j++) s[m][j] = _mm256_add_epi32(s[m][j], _mm256_madd_epi16(v[j], xk));
            }
        }
        for (int m = 0; m < rows; m++) {   /* bounds as above; rows back in order */
            const __m256 scale = _mm256_set1_ps(dx[m]);
            const __m256i in_order[4] = {
                _mm256_permute2x128_si256(s[m][0], s[m][1], 0x20), _mm256_permute2x128_si256(s[m][0], s[m][1], 0x31),
                _mm256_permute2x128_si256(s[m][2], s[m][3], 0x20), _mm256_permute2x128_si256(s[m][2], s[m][3], 0x31),
            };
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(sums[m] + UNIT * c + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(in_order[j]), scale));
        }
    }
}
#endif

#if CODE_BYTES
/* rounded_group_sums over code bytes: `codes` points at the tile's bytes of the group's first k, 64 bytes
 * per pair of k (row d's code at k in byte 2 d, at k + 1 in byte 2 d + 1), so 16 bytes widened to words are
 * rows 8 j .. 8 j + 7's (code at k, code at k + 1), in row order. Bounds as in rounded_group_sums. */
static inline __attribute__((always_inline)) void byte_group_sums(const uint8_t *codes, int64_t group,
        const int16_t *const *q, const float *dx, const int rows, float sums[ROWS_PER_PASS][MAX_TILE]) {
    __m256i s[ROWS_PER_PASS][4];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) s[m][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < group; k += 2) {
        __m256i v[4];
        for (int j = 0; j < 4; j++) v[j] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + 32 * k + 16 * j)));
        for (int m = 0; m < rows; m++) {
            int32_t pair;
            memcpy(&pair, q[m] + k, sizeof(pair));   /* q[k] in the low word, as the codes of k */
            const __m256i xk = _mm256_set1_epi32(pair);
            for (int j = 0; j < 4; j++) s[m][j] = _mm256_add_epi32(s[m][j], _mm256_madd_epi16(v[j], xk));
        }
    }
    for (int m = 0; m < rows; m++) {
        const __m256 scale = _mm256_set1_ps(dx[m]);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(sums[m] + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(s[m][j]), scale));
    }
}
#endif

/* The element offset in `sz` of row `row`'s pair of group gg. */
static inline int64_t pair_at(const ondo_int4_weight *w, int64_t gg, int64_t row) {
    if (!w->sz_blocks) return (gg * w->n_pad + row) * 2;
    const int64_t groups = w->planes * (w->k_in / (w->padded16 ? 16 : w->group));
    return ((row / SZ_BLOCK * groups + gg) * SZ_BLOCK + row % SZ_BLOCK) * 2;
}

/* The scales and zeros of group gg (of the planes' groups) for the product's units (row_of: their rows).
 * With digits, those of the whole code: the high digit's plane has scale 16 s and zero 0, so its
 * (zero - 8 scale) is -128 s, exactly, and its pairs are never read (nor brought into memory). */
static inline __attribute__((always_inline)) void group_scales(const ondo_int4_weight *w, int64_t gg, int digits,
                                                               const int64_t *row_of, int units, float *scale,
                                                               float *zero) {
    for (int c = 0; c < units; c++) {
        unit_scales(w->sz, w->sz_dtype, pair_at(w, gg, row_of[UNIT * c]), pair_at(w, gg, row_of[UNIT * c + UNIT / 2]),
                    scale + UNIT * c, zero + UNIT * c);
        if (digits)
            for (int j = 0; j < UNIT; j++) zero[UNIT * c + j] -= 128.0f * scale[UNIT * c + j];
    }
}

/* count sums of consecutive outputs n0 .. into a row of out: rounded to the dtype, then + bias rounded
 * again, as out + bias (a float32 row without bias as it is). */
static inline void store_outputs(int dtype, char *o, int64_t n0, const float *v, int count, const void *bias) {
    if (dtype == F32) {
        float *out = (float *)o + n0;
        if (bias)
            for (int i = 0; i < count; i++) out[i] = v[i] + ((const float *)bias)[n0 + i];
        else
            memcpy(out, v, sizeof(float) * (size_t)count);
        return;
    }
    uint16_t *out = (uint16_t *)o + n0;
    for (int i = 0; i < count; i++) {
        float r = round_to(BF16, v[i]);
        if (bias) r += bf16_to_float(((const uint16_t *)bias)[n0 + i]);
        out[i] = float_to_bf16(r);
    }
}

/* Products of `units` consecutive units of one tile, from its unit c0, with `rows` activation rows;
 * `tile_units` = T / 32 and `units` are constants where inlined. */
static inline __attribute__((always_inline)) void tile_product(
        int dtype, const activations *a, int64_t rows, const ondo_int4_weight *w, const void *bias,
        const uint8_t *tile_codes, int64_t first_row, const int tile_units, int c0, const int units, void *out,
        int64_t out_stride) {
    const int64_t inputs = w->padded16 ? 16 : w->group;            /* real inputs of a group */
    const int64_t groups = w->k_in / inputs, half = UNIT / 2 * tile_units;   /* half: bytes per k */
    int64_t row_of[MAX_TILE];                                      /* unit c: 16 low rows, then 16 high */
    for (int c = 0; c < units; c++)
        for (int i = 0; i < UNIT / 2; i++) {
            row_of[UNIT * c + i] = first_row + (c0 + c) * (UNIT / 2) + i;
            row_of[UNIT * c + i + UNIT / 2] = first_row + half + (c0 + c) * (UNIT / 2) + i;
        }
    float acc[BLOCK_ROWS][MAX_TILE], sums[ROWS_PER_PASS][MAX_TILE], scale[MAX_TILE], zero[MAX_TILE];
    const int digits = ROUNDED_X && w->planes == 2 && w->digits;   /* integer sums take a whole 8-bit code */
    const int bytes = CODE_BYTES && digits && w->layout == 1;      /* ... stored as one byte (tiles of 32 rows) */
    const int paired = CODE_BYTES && w->layout == 2;               /* bytes in row_pairs' order (tiles of 32 rows) */
    const int64_t scale_groups = (digits ? 1 : w->planes) * groups;
    /* Several passes of rows (a prefill): each group's scales decoded once, not once a pass. */
    float *kept = rows > ROWS_PER_PASS ? malloc(sizeof(float) * 2 * MAX_TILE * scale_groups) : NULL;
    for (int64_t gg = 0; kept && gg < scale_groups; gg++)
        group_scales(w, gg, digits, row_of, units, kept + 2 * MAX_TILE * gg, kept + 2 * MAX_TILE * gg + MAX_TILE);
#if SHARED_WORDS
    __m256i words[2 * 128 * 4];   /* group_words of one group: at most 2 units, groups of at most 256 */
#endif
    for (int64_t b0 = 0; b0 < rows; b0 += BLOCK_ROWS) {
        const int64_t block = rows - b0 < BLOCK_ROWS ? rows - b0 : BLOCK_ROWS;
        memset(acc, 0, sizeof(acc[0]) * (size_t)block);
        /* the planes' groups one after the other, or with digits each group's two planes at once */
        for (int64_t gg = 0; gg < scale_groups; gg++) {
            const int64_t g = gg % groups;
            const float *sc = scale, *zr = zero;
            if (kept) {
                sc = kept + 2 * MAX_TILE * gg;
                zr = sc + MAX_TILE;
            } else {
                group_scales(w, gg, digits, row_of, units, scale, zero);
            }
#if ROUNDED_X
            /* a padded group's last 16 codes skipped; code bytes: both digits' bytes of a k */
            const uint8_t *codes = tile_codes + gg * w->group * (bytes ? 2 * half : half);
            const uint8_t *high = codes + groups * w->group * half;     /* the second plane's (digits) */
#if SHARED_WORDS
            const __m256i *shared = NULL;
            if (block > ROWS_PER_PASS && !bytes) {   /* more than one pass: the codes decoded once for all */
                if (digits) group_words(codes, high, inputs, tile_units, c0, units, 1, paired, words);
                else if (paired) group_words(codes, high, inputs, tile_units, c0, units, 0, 1, words);
                else group_words(codes, high, inputs, tile_units, c0, units, 0, 0, words);
                shared = words;
            }
#endif
#endif
            for (int64_t m0 = b0; m0 < b0 + block; m0 += ROWS_PER_PASS) {
                const int pass = b0 + block - m0 < ROWS_PER_PASS ? (int)(b0 + block - m0) : ROWS_PER_PASS;
#if ROUNDED_X
                const int16_t *qg[ROWS_PER_PASS];
                float dxg[ROWS_PER_PASS];
                for (int m = 0; m < pass; m++) {
                    qg[m] = a->xq + (m0 + m) * w->k_in + g * inputs;
                    dxg[m] = a->dx[(m0 + m) * groups + g];
                }
#if SHARED_WORDS   /* decoded here or read from `shared`: a constant where inlined, no test inside the k loop */
#define SUMS(r, d, p) if (shared) rounded_group_sums(codes, high, inputs, qg, dxg, r, tile_units, c0, units, d, p, shared, sums); \
                      else rounded_group_sums(codes, high, inputs, qg, dxg, r, tile_units, c0, units, d, p, NULL, sums); break
#else
#define SUMS(r, d, p) rounded_group_sums(codes, high, inputs, qg, dxg, r, tile_units, c0, units, d, sums); break
#endif
#if CODE_BYTES
                if (bytes) {
                    if (pass == 1) byte_group_sums(codes, inputs, qg, dxg, 1, sums);
                    else byte_group_sums(codes, inputs, qg, dxg, 2, sums);
                } else
#endif
                /* constant row count, plane rule and byte order: no test of them inside the k loop */
                switch (2 * pass + digits + 16 * paired) {
                    case 2: SUMS(1, 0, 0);
                    case 3: SUMS(1, 1, 0);
#if ROWS_PER_PASS >= 6
                    case 6: SUMS(3, 0, 0);
                    case 7: SUMS(3, 1, 0);
                    case 8: SUMS(4, 0, 0);
                    case 9: SUMS(4, 1, 0);
                    case 10: SUMS(5, 0, 0);
                    case 11: SUMS(5, 1, 0);
                    case 12: SUMS(6, 0, 0);
                    case 13: SUMS(6, 1, 0);
#endif
#if SHARED_WORDS
                    case 18: SUMS(1, 0, 1);
                    case 19: SUMS(1, 1, 1);
                    case 20: SUMS(2, 0, 1);
                    case 21: SUMS(2, 1, 1);
#endif
                    case 5: SUMS(2, 1, 0);
                    default: SUMS(2, 0, 0);
                }
#undef SUMS
#else
                const float *xg[ROWS_PER_PASS];
                for (int m = 0; m < pass; m++) xg[m] = a->xf + (m0 + m) * w->k_in + g * inputs;
                /* a padded group's last 16 codes meet zero inputs: skipped */
                const uint8_t *codes = tile_codes + gg * w->group * half + c0 * (UNIT / 2);
                switch (pass) {   /* a constant row count: no test of it inside the k loop */
                    case 1: group_sums(codes, half, inputs, xg, 1, units, sums); break;
#if ROWS_PER_PASS > 2
                    case 3: group_sums(codes, half, inputs, xg, 3, units, sums); break;
                    case 4: group_sums(codes, half, inputs, xg, 4, units, sums); break;
                    case 5: group_sums(codes, half, inputs, xg, 5, units, sums); break;
                    case 6: group_sums(codes, half, inputs, xg, 6, units, sums); break;
#endif
                    default: group_sums(codes, half, inputs, xg, 2, units, sums); break;
                }
#endif
                for (int m = 0; m < pass; m++) {
                    const float sx = a->xsum[(m0 + m) * groups + g];
                    float *row_acc = acc[m0 - b0 + m];
                    #pragma omp simd
                    for (int j = 0; j < UNIT * units; j++) row_acc[j] += sc[j] * sums[m][j] + zr[j] * sx;
                }
            }
        }
        for (int64_t m = b0; m < b0 + block; m++) {
            char *o = row_ptr(dtype, out, m, out_stride);
            for (int j0 = 0; j0 < UNIT * units; j0 += UNIT / 2) {   /* 16 consecutive outputs each */
                const int64_t n0 = row_of[j0], left = w->n_out - n0;
                store_outputs(dtype, o, n0, acc[m - b0] + j0, left < UNIT / 2 ? (left > 0 ? (int)left : 0) : UNIT / 2, bias);
            }
        }
    }
    free(kept);
}

/* out[i] = row rows[i] of the weight, dequantized (an embedding lookup of a tied head), the numbers of
 * int4_planes.Int4PlanesMethod._rows: each plane's code * scale + (zero - 8 scale) (or (code - 8) * scale
 * + zero, as the pairs hold them) rounded apart, the planes added, then rounded to `dtype`. */
int ondo_int4_rows(int dtype, const ondo_int4_weight *w, const int64_t *rows, int64_t count, void *out) {
    for (int64_t i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= w->n_out) return -1;
    const int64_t inputs = w->padded16 ? 16 : w->group, groups = w->k_in / inputs;
    const int64_t k_eff = groups * w->group, half = w->tile / 2;   /* k_eff: codes a plane (padding too) */
    float *row = malloc((size_t)w->k_in * sizeof(float));
    for (int64_t i = 0; i < count; i++) {
        const int64_t n = rows[i], d = n % w->tile;
        const uint8_t *tile = w->qweight + n / w->tile * (w->planes * k_eff * half);
        for (int64_t g = 0; g < groups; g++) {
            float scale[2], second[2];
            for (int p = 0; p < w->planes; p++) {
                const int64_t at = pair_at(w, p * groups + g, n);
                if (w->sz_dtype == F16_MIN) {
                    scale[p] = f16_to_float(((const uint16_t *)w->sz)[at]);
                    second[p] = f16_to_float(((const uint16_t *)w->sz)[at + 1]);
                } else if (w->sz_dtype == BF16) {
                    scale[p] = bf16_to_float(((const uint16_t *)w->sz)[at]);
                    second[p] = bf16_to_float(((const uint16_t *)w->sz)[at + 1]);
                } else {
                    scale[p] = ((const float *)w->sz)[at];
                    second[p] = ((const float *)w->sz)[at + 1];
                }
            }
            for (int64_t j = 0; j < inputs; j++) {
                const int64_t k = g * w->group + j;
                float sum = 0.0f;
                for (int p = 0; p < w->planes; p++) {
                    int code;
                    if (w->layout == 1) {   /* one byte: low digit | high digit << 4 */
                        const uint8_t b = tile[k / 2 * 64 + 2 * d + k % 2];
                        code = p ? b >> 4 : b & 15;
                    } else {                /* a byte holds rows d % half and d % half + half */
                        const int64_t kk = p * k_eff + k;
                        const uint8_t b = w->layout == 2 ? tile[kk / 2 * 2 * half + 2 * (d % half) + kk % 2]
                                                         : tile[kk * half + d % half];
                        code = d < half ? b & 15 : b >> 4;
                    }
                    const float v = w->sz_dtype == F16_MIN ? (float)code * scale[p] + second[p]
                                                           : (float)(code - 8) * scale[p] + second[p];
                    sum = p ? sum + v : v;
                }
                row[g * inputs + j] = sum;
            }
        }
        store_row(dtype, row, row_ptr(dtype, out, i, w->k_in), w->k_in);
    }
    free(row);
    return 0;
}

/* One group of a row's inputs as the product reads them: *xsum = their sum and, with ROUNDED_X, q and *dx:
 * q = round-half-even(x * (32767 / max |x|)), dx = max |x| / 32767, and *xsum = dx * sum q. */
static inline void prepare_group(const float *xg, int64_t inputs, int16_t *q, float *dx, float *xsum) {
#if ROUNDED_X_AVX512   /* inputs: 16 to 256, a multiple of 16 */
    __m512 top16 = _mm512_setzero_ps();
    for (int64_t k = 0; k < inputs; k += 16) top16 = _mm512_max_ps(top16, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
    const float top = _mm512_reduce_max_ps(top16);
    const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < inputs; k += 16) {   /* the conversion rounds half to even, as lrintf */
        const __m512i q32 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), inverse));
        _mm256_storeu_si256((__m256i *)(q + k), _mm512_cvtsepi32_epi16(q32));
        total = _mm512_add_epi32(total, q32);
    }
    *dx = top / 32767.0f;
    *xsum = *dx * (float)_mm512_reduce_add_epi32(total);
#elif ROUNDED_X   /* AVX2: the same values, 8 inputs a vector */
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 top8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < inputs; k += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(_mm256_loadu_ps(xg + k), magnitude));
    __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
    const float top = _mm_cvtss_f32(_mm_max_ss(top4, _mm_shuffle_ps(top4, top4, 1)));
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    __m256i total = _mm256_setzero_si256();
    for (int64_t k = 0; k < inputs; k += 16) {   /* the conversion rounds half to even, as lrintf */
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inverse));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8), inverse));
        /* the saturating pack interleaves 128-bit lanes: a 64-bit permute puts them back in order */
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
        total = _mm256_add_epi32(total, _mm256_add_epi32(a, b));
    }
    __m128i total4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    total4 = _mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0x4e));
    total4 = _mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0xb1));
    *dx = top / 32767.0f;
    *xsum = *dx * (float)_mm_cvtsi128_si32(total4);
#else
    (void)q;
    (void)dx;
    float total = 0.0f;
    for (int64_t k = 0; k < inputs; k++) total += xg[k];
    *xsum = total;
#endif
}

/* out[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for n < n_out, over every plane. x: `rows` rows of k_in
 * (dtype, row stride x_stride elements); out in the same dtype. `threads` OpenMP threads share the tiles
 * (torch's thread count, passed by the caller: the OpenMP runtime is torch's own libgomp). */
void ondo_int4_mm(int dtype, const void *x, int64_t rows, int64_t x_stride, const ondo_int4_weight *w,
                  const void *bias, void *out, int64_t out_stride, int threads) {
    const int64_t inputs = w->padded16 ? 16 : w->group, groups = w->k_in / inputs;
    float *xf = malloc((size_t)(rows * (w->k_in + 2 * groups)) * sizeof(float));
    float *dx = xf + rows * w->k_in, *xsum = dx + rows * groups;
    int16_t *xq = ROUNDED_X ? malloc((size_t)(rows * w->k_in) * sizeof(int16_t)) : NULL;
    const activations a = {.xf = xf, .xq = xq, .dx = dx, .xsum = xsum};
    /* the threads share a prefill's rows (serial, rounding them was 4 % of the samples, the other
     * thread waiting) */
    #pragma omp parallel for num_threads(threads) if (rows > 1)
    for (int64_t m = 0; m < rows; m++) {
        load_row(dtype, row_ptr(dtype, x, m, x_stride), xf + m * w->k_in, w->k_in);
        for (int64_t g = 0; g < groups; g++)
            prepare_group(xf + m * w->k_in + g * inputs, inputs, ROUNDED_X ? xq + m * w->k_in + g * inputs : NULL,
                          dx + m * groups + g, xsum + m * groups + g);
    }
    /* Each thread takes an equal share of the 32-row units (torch's 64-row tiles would split the 9 tiles
     * of a 576-row product 5 to 4); a tile whose two units it both holds is decoded as one. */
    const int64_t tile_bytes = w->planes * groups * w->group * w->tile / 2;
    const int tile_units = (int)(w->tile / UNIT);
    const int64_t total = w->n_pad / UNIT, parts = threads < total ? threads : total;
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t part = 0; part < parts; part++) {
        for (int64_t u = total * part / parts, end = total * (part + 1) / parts; u < end;) {
            const int64_t t = u / tile_units;
            const int c0 = (int)(u % tile_units);
            const uint8_t *codes = w->qweight + t * tile_bytes;
            if (tile_units == 1) {
                tile_product(dtype, &a, rows, w, bias, codes, t * w->tile, 1, 0, 1, out, out_stride);
                u += 1;
            } else if (c0 == 0 && end - u >= 2) {
                tile_product(dtype, &a, rows, w, bias, codes, t * w->tile, 2, 0, 2, out, out_stride);
                u += 2;
            } else {
                tile_product(dtype, &a, rows, w, bias, codes, t * w->tile, 2, c0, 1, out, out_stride);
                u += 1;
            }
        }
    }
    free(xq);
    free(xf);
}
