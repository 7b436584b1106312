/* Attention of chain rows over each request's own cache, every request of a step in one call.
 *
 * A decode step's attention is tiny (one query row over a few hundred keys: ~0.2 MFLOP a head) but
 * torch's CPU attention costs ~60-100 us a call, and a batched step called it once a request and a
 * layer: a fifth of a 16-request step, a third of a self-draft level (docs/perf.md, stop 32). Here
 * one call per layer runs every (row, head) of every request, each over its request's keys read in
 * place from the cache buffers.
 *
 * Row i of request r sits at position p = past[r] + i and attends to keys [lo, p], lo = 0 or, with a
 * sliding window w, max(0, p - w + 1): the causal chain mask of models/native.py. Each (row, head)
 * is computed alone, in the same order whatever the row count, the request count or the threads:
 * a k-row verification's attention equals k one-row steps' bit for bit, and a request's equals
 * what it gets alone. Float32 in, float32 sums, exact two-pass softmax. Returns 0, or -1 where memory
 * for the scores could not be had (out is then incomplete).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#include <immintrin.h>

/* a . b: four chains of 16 lanes, then a fixed reduction (the same sum on every call). */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int k = 0;
    for (; k + 64 <= d; k += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 32), _mm512_loadu_ps(b + k + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 48), _mm512_loadu_ps(b + k + 48), s3);
    }
    for (; k < d; k += 16) { /* the tail, masked */
        const __mmask16 m = d - k >= 16 ? 0xFFFF : (__mmask16)((1u << (d - k)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

/* o[e] = sum_j w[j] v[j][e] / total (e < d, j < t), each sum in order of j: 128 outputs a pass, their
 * sums in eight registers while the keys go by. */
static inline __attribute__((always_inline)) void weighted_sum(const float *w, const float *v, int t, int d,
                                                               float total, float *o) {
    int e0 = 0;
    for (; e0 + 128 <= d; e0 += 128) {
        __m512 acc[8];
        for (int l = 0; l < 8; l++) acc[l] = _mm512_setzero_ps();
        for (int j = 0; j < t; j++) {
            const __m512 wj = _mm512_set1_ps(w[j]);
            const float *vj = v + (int64_t)j * d + e0;
            for (int l = 0; l < 8; l++) acc[l] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(vj + 16 * l), acc[l]);
        }
        const __m512 sum = _mm512_set1_ps(total);
        for (int l = 0; l < 8; l++) _mm512_storeu_ps(o + e0 + 16 * l, _mm512_div_ps(acc[l], sum));
    }
    for (; e0 < d; e0 += 16) {
        const __mmask16 m = d - e0 >= 16 ? 0xFFFF : (__mmask16)((1u << (d - e0)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < t; j++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_maskz_loadu_ps(m, v + (int64_t)j * d + e0), acc);
        _mm512_mask_storeu_ps(o + e0, m, _mm512_div_ps(acc, _mm512_set1_ps(total)));
    }
}
#else
#define ACC 32 /* partial sums: the compiler keeps them in vector registers (four AVX2 ones) */

static inline float dot(const float *a, const float *b, int d) {
    float acc[ACC] = {0};
    int k = 0;
    for (; k + ACC <= d; k += ACC)
        for (int l = 0; l < ACC; l++) acc[l] += a[k + l] * b[k + l];
    for (; k < d; k++) acc[k % ACC] += a[k] * b[k];
#define HALVE(WIDTH) for (int l = 0; l < (WIDTH); l++) acc[l] += acc[l + (WIDTH)]
    HALVE(16); HALVE(8); HALVE(4); HALVE(2); HALVE(1); /* a fixed tree: the same sum on every call */
#undef HALVE
    return acc[0];
}

static inline void weighted_sum(const float *w, const float *v, int t, int d, float total, float *o) {
    for (int e0 = 0; e0 < d; e0 += ACC) {
        const int width = d - e0 < ACC ? d - e0 : ACC;
        float acc[ACC] = {0};
        for (int j = 0; j < t; j++)
            for (int l = 0; l < width; l++) acc[l] += w[j] * v[(int64_t)j * d + e0 + l];
        for (int l = 0; l < width; l++) o[e0 + l] = acc[l] / total;
    }
}
#endif

/* q: element (n, h, e) at q[n * q_row + h * q_head + e] (rows of all requests, request after request);
 * keys[r], values[r]: request r's cache, element (g, j, e) at [g * kv_head[r] + j * D + e];
 * past[r]: its keys before this step; rows[r]: its rows in q; out [N][H][D]. */
int chain_attention(const float *q, int64_t q_row, int64_t q_head, const float *const *keys,
                     const float *const *values, const int64_t *kv_head, const int *past, const int *rows, int R,
                     int H, int KVH, int D, int window, float scale, float *out, int threads) {
    int N = 0, longest = 1;
    for (int r = 0; r < R; r++) {
        N += rows[r];
        if (past[r] + rows[r] > longest) longest = past[r] + rows[r];
    }
    if (N <= 0) return 0;
    if (H <= 0 || KVH <= 0 || H % KVH) return -1;
    int *request = malloc(sizeof(int) * N), *first = malloc(sizeof(int) * R);
    int failed = !request || !first;
    for (int r = 0, n = 0; !failed && r < R; r++) {
        first[r] = n;
        for (int i = 0; i < rows[r]; i++) request[n++] = r;
    }
    const int group = H / KVH;
    _Pragma("omp parallel num_threads(threads) if (!failed)") {
        float *score = failed ? NULL : malloc(sizeof(float) * longest);
        if (!score) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(dynamic, 1)")
        for (int task = 0; task < N * H; task++) {
            const int n = task / H, h = task % H, r = request[n];
            const int p = past[r] + (n - first[r]);
            const int lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const float *qv = q + n * q_row + h * q_head;
            const float *k = keys[r] + (h / group) * kv_head[r], *v = values[r] + (h / group) * kv_head[r];
            float *o = out + ((int64_t)n * H + h) * D;
            if (!score) continue;
            float top = -INFINITY;
            for (int j = lo; j <= p; j++) {
                score[j - lo] = dot(qv, k + (int64_t)j * D, D) * scale;
                if (score[j - lo] > top) top = score[j - lo];
            }
            float total = 0.0f;
            for (int j = 0; j < p - lo + 1; j++) {
                score[j] = expf(score[j] - top);
                total += score[j];
            }
            weighted_sum(score, v + (int64_t)lo * D, p - lo + 1, D, total, o);
        }
        free(score);
    }
    free(request);
    free(first);
    return failed ? -1 : 0;
}
