/* Fused NearSwap chain over contiguous arrays: one pass over memory for all stages.
 *
 * Bit-identical to the pure-torch path and to the card's numpy formula:
 * float32 arithmetic in the same order, no FMA contraction (-ffp-contract=off),
 * NaN payloads propagated as x86 numpy does (the left operand's NaN wins in the
 * final add), and torch's float16 / bfloat16 rounding, NaNs included.
 */
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };
#define BLOCK 1024

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xFFFF; /* torch's NaN */
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static void load(const void *src, int dtype, int64_t i, int64_t n, float *dst) {
    if (dtype == F32) {
        memcpy(dst, (const float *)src + i, n * sizeof(float));
    } else if (dtype == F16) {
        const _Float16 *s = (const _Float16 *)src + i;
        for (int64_t j = 0; j < n; j++) dst[j] = (float)s[j];
    } else {
        const uint16_t *s = (const uint16_t *)src + i;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    }
}

static void store(void *out, int dtype, int64_t i, int64_t n, const float *src) {
    if (dtype == F32) {
        memcpy((float *)out + i, src, n * sizeof(float));
    } else if (dtype == F16) {
        _Float16 *o = (_Float16 *)out + i;
        for (int64_t j = 0; j < n; j++) o[j] = (_Float16)src[j];
    } else {
        uint16_t *o = (uint16_t *)out + i;
        for (int64_t j = 0; j < n; j++) o[j] = f32_to_bf16(src[j]);
    }
}

static void round_trip(float *a, int dtype, int64_t n) {
    if (dtype == F16) {
        for (int64_t j = 0; j < n; j++) a[j] = (float)(_Float16)a[j];
    } else if (dtype == BF16) {
        for (int64_t j = 0; j < n; j++) a[j] = bf16_to_f32(f32_to_bf16(a[j]));
    }
}

/* w = t / |a - b|; NaN, +inf -> 1; clip to [0, 1] (w >= 0 since t >= 0). */
static inline float weight(float a, float b, float t) {
    float w = t / __builtin_fabsf(a - b); /* fabs clears the sign bit: |-0| = +0 */
    return (w <= 1.0f) ? w : 1.0f;
}

/* (1 - w) * a + w * b, keeping numpy's operand order when both terms are NaN. */
static inline float mix(float a, float b, float w) {
    float x = (1.0f - w) * a;
    float y = w * b;
    float r = x + y;
    return (x != x) ? x : r;
}

static void stage(float *restrict a, const float *restrict b, float t, int64_t n) {
    for (int64_t j = 0; j < n; j++) a[j] = mix(a[j], b[j], weight(a[j], b[j], t));
}

/* out[start:stop] = chain(base, secondaries, t); every array has `dtype`. */
void nearswap_chain_range(const void *base, const void *const *secondaries, const float *t,
                          int stages, int dtype, int round_stages, void *out,
                          int64_t start, int64_t stop) {
    float a[BLOCK], b[BLOCK];
    for (int64_t i = start; i < stop; i += BLOCK) {
        int64_t n = stop - i < BLOCK ? stop - i : BLOCK;
        load(base, dtype, i, n, a);
        for (int k = 0; k < stages; k++) {
            load(secondaries[k], dtype, i, n, b);
            stage(a, b, t[k], n);
            if (round_stages) round_trip(a, dtype, n);
        }
        store(out, dtype, i, n, a);
    }
}

/* The chain over a block of rows, with the per-row statistics `stats` reports,
 * for each stage k (arrays [stages][rows], zeroed by the caller): elements equal
 * in v0 and v1; elements fully swapped (w == 1); elements moved (result != v0,
 * finite shift); the sum of their |shift|; elements where v0 or v1 is NaN or
 * infinite. All inputs have `dtype`. */
void nearswap_chain_rows(const void *base, const void *const *secondaries, const float *t,
                         int stages, int dtype, int round_stages, int64_t rows,
                         int64_t row_len, int64_t *identical, int64_t *full,
                         int64_t *moved, double *shift_sum, int64_t *nonfinite) {
    const float max = 3.4028234663852886e38f;
    float a[BLOCK], b[BLOCK], r[BLOCK];
    for (int64_t row = 0; row < rows; row++) {
        for (int64_t i = 0; i < row_len; i += BLOCK) {
            int64_t n = row_len - i < BLOCK ? row_len - i : BLOCK;
            int64_t at = row * row_len + i;
            load(base, dtype, at, n, a);
            for (int k = 0; k < stages; k++) {
                int64_t same = 0, swapped = 0, count = 0, finite = 0;
                double shift = 0.0;
                float tk = t[k];
                load(secondaries[k], dtype, at, n, b);
                /* simd reductions: integer counts are exact in any order; the
                   float64 shift sums differ from a sequential sum in the last bits. */
#pragma omp simd reduction(+ : same, swapped, finite)
                for (int64_t j = 0; j < n; j++) {
                    float w = weight(a[j], b[j], tk);
                    r[j] = mix(a[j], b[j], w);
                    same += a[j] == b[j];
                    swapped += w == 1.0f;
                    finite += (__builtin_fabsf(a[j]) <= max) & (__builtin_fabsf(b[j]) <= max);
                }
                if (round_stages) round_trip(r, dtype, n);
#pragma omp simd reduction(+ : count, shift)
                for (int64_t j = 0; j < n; j++) {
                    float d = __builtin_fabsf(r[j] - a[j]);
                    int m = (r[j] != a[j]) & (d <= max);
                    count += m;
                    shift += m ? (double)d : 0.0;
                    a[j] = r[j];
                }
                int64_t slot = (int64_t)k * rows + row;
                identical[slot] += same;
                full[slot] += swapped;
                moved[slot] += count;
                shift_sum[slot] += shift;
                nonfinite[slot] += n - finite;
            }
        }
    }
}
