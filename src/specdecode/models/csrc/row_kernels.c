/* Products for a few rows that stay memory-bound: out[m, n] = sum_k x[m, k] * w[n, k].
 * Three kernels: bf16_rows (bf16 weights and rows), int8_rows (weights as int8 with a float32 scale
 * per 32 inputs, rows as int16 with a scale each) and q8_rows (the same weights, rows as int8 with a
 * scale per 32 inputs); the int8 ones are the LM head's screens (models/heads.py).
 *
 * bf16_rows: oneDNN's bf16 kernel turns compute-bound at ~5 rows on a 2-core Zen 4 (docs/perf.md, stop 26),
 * so a 5-token verification cost 1.4x a 1-token step. Here the weight is packed once as
 * [N/16][K/2][16][2]: one 64-byte load holds two k-values of 16 outputs, and AVX-512 BF16's
 * dot-product instruction (vdpbf16ps) adds both products of a row into 16 float32 lanes, so a row
 * costs one instruction per 64 weight bytes and no horizontal sums. Each row's sum runs in the
 * same order whatever the row count, so k rows give bit for bit what k one-row calls give.
 * Without AVX-512 BF16 this file compiles to `bf16_rows_available() == 0` and is not offered.
 */
#include <stddef.h>
#include <stdint.h>

#define LANES 16
#define MAX_ROWS 8  /* rows a pass: a pass turns compute-bound past ~8 rows on a Zen 4 */
#define TILE_BLOCKS 12  /* blocks of a tile all passes read: 12 x K x 32 bytes, 240 KB at K = 640 */
#define TILES_PER_THREAD 8  /* tiles only where each thread gets this many (even shares) */

/* Computes rows [m0, m0 + rows) for blocks [b0, b1) of 16 outputs. */
typedef void (*span_fn)(const void *args, int m0, int rows, int b0, int b1);

/* Who computes what, for both kernels: M rows in near-equal passes of at most MAX_ROWS (on a Zen 4,
 * 9 rows cost less as 5 + 4 than as one pass of 2 blocks, 16 as 8 + 8 than as 6 + 5 + 5), the
 * blocks split among the threads. Where the weight is large, a thread takes a tile of TILE_BLOCKS
 * blocks at a time and runs every pass over it, so that only the first pass reads the tile from
 * memory and the others from the core's L2 (a 262k-row head: 16 rows ~0.7x, 32 rows ~0.6x the time
 * of pass after pass over the whole weight; weights that stay in L3 gain nothing). */
static __attribute__((unused)) void for_tiles(span_fn span, const void *args, int M, int N, int threads) {
    const int nblocks = (N + LANES - 1) / LANES, passes = (M + MAX_ROWS - 1) / MAX_ROWS;
    if (nblocks <= 0 || passes <= 0) return;
    const int tile = passes > 1 && nblocks >= TILE_BLOCKS * TILES_PER_THREAD * threads
        ? TILE_BLOCKS : (nblocks + threads - 1) / threads;
    const int tiles = (nblocks + tile - 1) / tile;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int t = 0; t < tiles; t++) {
        const int b0 = t * tile, b1 = b0 + tile < nblocks ? b0 + tile : nblocks;
        for (int pass = 0, m0 = 0; pass < passes; pass++) {
            const int rows = (M - m0) / (passes - pass);
            span(args, m0, rows, b0, b1);
            m0 += rows;
        }
    }
}

/* Blocks [b0, b1) BLOCKS at a time and the rest one by one (a block's sums do not depend on which
 * blocks it is computed with); CALL(ROWS, BLOCKS, block) computes from `block`. */
#define SPAN(ROWS, BLOCKS, CALL)                                                                     \
    do {                                                                                             \
        int b = b0;                                                                                  \
        for (; b + BLOCKS <= b1; b += BLOCKS) CALL(ROWS, BLOCKS, b);                                 \
        for (; b < b1; b++) CALL(ROWS, 1, b);                                                        \
    } while (0)

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

int bf16_rows_available(void) { return 1; }

/* ROWS rows times BLOCKS consecutive blocks of 16 outputs; compile-time counts so that the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void blocks(
    const uint16_t *x, const uint16_t *w, int K, int ROWS, int BLOCKS, int block0, int N,
    const float *bias, void *out, int out_bf16) {
    __m512 acc[4][MAX_ROWS];
    const int pairs = K / 2;
    const int32_t *xp[MAX_ROWS];
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; m++) xp[m] = (const int32_t *)(x + (int64_t)m * K);
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++) acc[b][m] = _mm512_setzero_ps();
    const uint16_t *wb = w + (int64_t)block0 * pairs * 2 * LANES;
    const int64_t block_stride = (int64_t)pairs * 2 * LANES;
    for (int p = 0; p < pairs; p++) {
        __m512bh wv[4];
#pragma GCC unroll 4
        for (int b = 0; b < BLOCKS; b++)
            wv[b] = (__m512bh)_mm512_loadu_si512((const void *)(wb + b * block_stride + (int64_t)p * 2 * LANES));
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[m][p]);
#pragma GCC unroll 4
            for (int b = 0; b < BLOCKS; b++) acc[b][m] = _mm512_dpbf16_ps(acc[b][m], xv, wv[b]);
        }
    }
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; b++) {
        const int n0 = (block0 + b) * LANES;
        const int valid = N - n0 < LANES ? N - n0 : LANES;
        const __mmask16 mask = valid >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
        __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++) {
            __m512 v = _mm512_add_ps(acc[b][m], add);
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + (int64_t)m * N + n0;
                _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(v));
            } else {
                _mm512_mask_storeu_ps((float *)out + (int64_t)m * N + n0, mask, v);
            }
        }
    }
}

struct bf16_args {
    const uint16_t *x, *w;
    int K, N;
    const float *bias;
    char *out;
    int out_bf16;
};

/* As many blocks at a time as the 32 vector registers hold (accumulators, one weight register a
 * block, the broadcast row) up to 4, enough independent sums to cover the instruction's latency. */
static void bf16_span(const void *args, int m0, int rows, int b0, int b1) {
    const struct bf16_args *a = (const struct bf16_args *)args;
    const uint16_t *x = a->x + (int64_t)m0 * a->K;
    void *out = a->out + (int64_t)m0 * a->N * (a->out_bf16 ? 2 : 4);
#define BF16_CALL(ROWS, BLOCKS, block) blocks(x, a->w, a->K, ROWS, BLOCKS, block, a->N, a->bias, out, a->out_bf16)
    switch (rows) {
        case 1: SPAN(1, 4, BF16_CALL); break;
        case 2: SPAN(2, 4, BF16_CALL); break;
        case 3: SPAN(3, 4, BF16_CALL); break;
        case 4: SPAN(4, 4, BF16_CALL); break;
        case 5: SPAN(5, 4, BF16_CALL); break;
        case 6: SPAN(6, 4, BF16_CALL); break;
        case 7: SPAN(7, 3, BF16_CALL); break;
        default: SPAN(8, 3, BF16_CALL); break;
    }
#undef BF16_CALL
}

/* x [M][K] bf16 row-major (K even), w packed by the caller, out [M][N] float32 or bf16, bias
 * float32 [N] or NULL (added before the one rounding to bf16); rows and blocks as for_tiles says. */
void bf16_rows(const uint16_t *x, const uint16_t *w, int M, int K, int N, const float *bias, void *out,
               int out_bf16, int threads) {
    const struct bf16_args args = {x, w, K, N, bias, (char *)out, out_bf16};
    for_tiles(bf16_span, &args, M, N, threads);
}
#else
int bf16_rows_available(void) { return 0; }
void bf16_rows(const uint16_t *x, const uint16_t *w, int M, int K, int N, const float *bias, void *out,
               int out_bf16, int threads) {
    (void)x; (void)w; (void)M; (void)K; (void)N; (void)bias; (void)out; (void)out_bf16; (void)threads;
}
#endif

/* int8_rows: out[m, n] = t[m] * sum_g scale[n, g] * sum_{k in group g} xq[m, k] * q[n, k]: int8
 * weights with a float32 scale per 32 inputs, rows as int16 with a float32 scale each. Integer
 * products summed exactly in int32 within a group (|sum| <= 32 * 32767 * 127 < 2^31), then in
 * float32 across groups. AVX-512 VNNI's vpdpwssd adds two int16 products a lane, so after one
 * sign extension per 32 weight bytes a row costs one instruction per 32 bytes: 1.125 bytes a weight
 * against bf16's 2, for the LM head's screen (models/heads.py bounds the error of both roundings).
 * The weight is packed as [N/16][K/2][16][2] int8 and the scales as [N/16][K/32][16] float32. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int int8_rows_available(void) { return 1; }

#define GROUP_PAIRS 16

/* The int8 kernels' results: each row's float32 totals of BLOCKS blocks of 16 outputs, times the row's
 * scale t[m] where rows have one (int8_rows), the last block masked at N. */
static inline __attribute__((always_inline)) void store_totals(__m512 total[4][8], const float *t, int ROWS,
                                                               int BLOCKS, int block0, int N, float *out) {
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; b++) {
        const int n0 = (block0 + b) * LANES;
        const int valid = N - n0 < LANES ? N - n0 : LANES;
        const __mmask16 mask = valid >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++)
            _mm512_mask_storeu_ps(out + (int64_t)m * N + n0, mask,
                                  t ? _mm512_mul_ps(total[b][m], _mm512_set1_ps(t[m])) : total[b][m]);
    }
}

/* Two accumulators a row and block (the group's integer sum and the total): as many blocks as 32
 * registers hold, for both int8 kernels. */
#define INT8_SPANS(CALL)                      \
    switch (rows) {                           \
        case 1: SPAN(1, 4, CALL); break;      \
        case 2: SPAN(2, 4, CALL); break;      \
        case 3: SPAN(3, 3, CALL); break;      \
        case 4: SPAN(4, 3, CALL); break;      \
        case 5: SPAN(5, 2, CALL); break;      \
        case 6: SPAN(6, 2, CALL); break;      \
        case 7: SPAN(7, 1, CALL); break;      \
        default: SPAN(8, 1, CALL); break;     \
    }

static inline __attribute__((always_inline)) void int8_blocks(
    const int16_t *x, const float *t, const int8_t *q, const float *scale, int K, int ROWS, int BLOCKS,
    int block0, int N, float *out) {
    __m512 total[4][8];
    __m512i part[4][8];
    const int pairs = K / 2, groups = (pairs + GROUP_PAIRS - 1) / GROUP_PAIRS;
    const int32_t *xp[8];
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; m++) xp[m] = (const int32_t *)(x + (int64_t)m * K);
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++) total[b][m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
#pragma GCC unroll 4
        for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) part[b][m] = _mm512_setzero_si512();
        const int end = (g + 1) * GROUP_PAIRS < pairs ? (g + 1) * GROUP_PAIRS : pairs;
        for (int p = g * GROUP_PAIRS; p < end; p++) {
            __m512i wv[4];
#pragma GCC unroll 4
            for (int b = 0; b < BLOCKS; b++) {
                const int8_t *src = q + ((int64_t)(block0 + b) * pairs + p) * 2 * LANES;
                wv[b] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)src));
            }
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) {
                const __m512i xv = _mm512_set1_epi32(xp[m][p]);
#pragma GCC unroll 4
                for (int b = 0; b < BLOCKS; b++) part[b][m] = _mm512_dpwssd_epi32(part[b][m], xv, wv[b]);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < BLOCKS; b++) {
            const __m512 sv = _mm512_loadu_ps(scale + ((int64_t)(block0 + b) * groups + g) * LANES);
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++)
                total[b][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[b][m]), sv, total[b][m]);
        }
    }
    store_totals(total, t, ROWS, BLOCKS, block0, N, out);
}

struct int8_args {
    const int16_t *x;
    const float *t;
    const int8_t *q;
    const float *scale;
    int K, N;
    float *out;
};

static void int8_span(const void *args, int m0, int rows, int b0, int b1) {
    const struct int8_args *a = (const struct int8_args *)args;
    const int16_t *x = a->x + (int64_t)m0 * a->K;
    const float *t = a->t + m0;
    float *out = a->out + (int64_t)m0 * a->N;
#define INT8_CALL(ROWS, BLOCKS, block) int8_blocks(x, t, a->q, a->scale, a->K, ROWS, BLOCKS, block, a->N, out)
    INT8_SPANS(INT8_CALL)
#undef INT8_CALL
}

/* x [M][K] int16 (K even) with scales t [M], q and scale packed by the caller, out [M][N] float32;
 * rows and blocks as for_tiles says. */
void int8_rows(const int16_t *x, const float *t, const int8_t *q, const float *scale, int M, int K, int N,
               float *out, int threads) {
    const struct int8_args args = {x, t, q, scale, K, N, out};
    for_tiles(int8_span, &args, M, N, threads);
}

/* q8_rows: out[m, n] = sum_g scale[n, g] * xs[m, g] * sum_{k in group g} xq[m, k] * q[n, k], the rows
 * too as int8 with a float32 scale per 32 inputs (GGUF's Q8_0 on both sides). AVX-512 VNNI's
 * vpdpbusd adds four unsigned x signed byte products a lane: a row costs one instruction per 64
 * weight bytes, half of int8_rows' count, so the screen stays memory-bound to more rows. The row is
 * fed as xq + 128 (0..255); wsum[n, g] = 128 * sum_{k in g} q[n, k] takes the offset back out of each
 * group's integer sum, exactly (|sums| <= 32 * 255 * 127 < 2^31). Weight packed as [N/16][K/4][16][4]
 * int8, scales [N/16][K/32][16] float32, wsum [N/16][K/32][16] int32; rows [M][K] uint8 and xs [M][K/32];
 * K a multiple of 32 (zero-padded by the caller). */
static inline __attribute__((always_inline)) void q8_blocks(
    const uint8_t *x, const float *xs, const int8_t *q, const float *scale, const int32_t *wsum, int K, int ROWS,
    int BLOCKS, int block0, int N, float *out) {
    __m512 total[4][8];
    __m512i part[4][8];
    const int quads = K / 4, groups = K / 32;
    const int32_t *xp[8];
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; m++) xp[m] = (const int32_t *)(x + (int64_t)m * K);
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; m++) total[b][m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
#pragma GCC unroll 4
        for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) part[b][m] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int p = g * 8; p < g * 8 + 8; p++) {
            __m512i wv[4];
#pragma GCC unroll 4
            for (int b = 0; b < BLOCKS; b++)
                wv[b] = _mm512_loadu_si512((const void *)(q + ((int64_t)(block0 + b) * quads + p) * 4 * LANES));
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) {
                const __m512i xv = _mm512_set1_epi32(xp[m][p]);
#pragma GCC unroll 4
                for (int b = 0; b < BLOCKS; b++) part[b][m] = _mm512_dpbusd_epi32(part[b][m], xv, wv[b]);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < BLOCKS; b++) {
            const int64_t at = ((int64_t)(block0 + b) * groups + g) * LANES;
            const __m512 sv = _mm512_loadu_ps(scale + at);
            const __m512i offset = _mm512_loadu_si512((const void *)(wsum + at));
#pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) {
                const __m512 factor = _mm512_mul_ps(sv, _mm512_set1_ps(xs[(int64_t)m * groups + g]));
                total[b][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(part[b][m], offset)), factor,
                                              total[b][m]);
            }
        }
    }
    store_totals(total, NULL, ROWS, BLOCKS, block0, N, out);
}

struct q8_args {
    const uint8_t *x;
    const float *xs;
    const int8_t *q;
    const float *scale;
    const int32_t *wsum;
    int K, N;
    float *out;
};

static void q8_span(const void *args, int m0, int rows, int b0, int b1) {
    const struct q8_args *a = (const struct q8_args *)args;
    const uint8_t *x = a->x + (int64_t)m0 * a->K;
    const float *xs = a->xs + (int64_t)m0 * (a->K / 32);
    float *out = a->out + (int64_t)m0 * a->N;
#define Q8_CALL(ROWS, BLOCKS, block) q8_blocks(x, xs, a->q, a->scale, a->wsum, a->K, ROWS, BLOCKS, block, a->N, out)
    INT8_SPANS(Q8_CALL)
#undef Q8_CALL
}

void q8_rows(const uint8_t *x, const float *xs, const int8_t *q, const float *scale, const int32_t *wsum, int M,
             int K, int N, float *out, int threads) {
    const struct q8_args args = {x, xs, q, scale, wsum, K, N, out};
    for_tiles(q8_span, &args, M, N, threads);
}
#else
int int8_rows_available(void) { return 0; }
void int8_rows(const int16_t *x, const float *t, const int8_t *q, const float *scale, int M, int K, int N,
               float *out, int threads) {
    (void)x; (void)t; (void)q; (void)scale; (void)M; (void)K; (void)N; (void)out; (void)threads;
}
void q8_rows(const uint8_t *x, const float *xs, const int8_t *q, const float *scale, const int32_t *wsum, int M,
             int K, int N, float *out, int threads) {
    (void)x; (void)xs; (void)q; (void)scale; (void)wsum; (void)M; (void)K; (void)N; (void)out; (void)threads;
}
#endif
