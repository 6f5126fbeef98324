/* Fused NearSwap chain over contiguous arrays: one pass over memory for all stages.
 *
 * Bit-identical to the pure-torch path and to the card's numpy formula:
 * float32 arithmetic in the same order, no FMA contraction (-ffp-contract=off),
 * NaN payloads propagated as x86 numpy does (the left operand's NaN wins in the
 * final add), and torch's float16 / bfloat16 rounding, NaNs included.
 *
 * Builds with GCC >= 9 and Clang >= 14 and needs only <stdint.h> (and
 * <immintrin.h> on x86). float16 conversions use F16C on x86 where the target
 * has it, _Float16 (the FCVT instructions) on aarch64, and a bit-exact software
 * version elsewhere: all three round to nearest even and quiet NaNs, keeping the
 * top of the payload.
 */
#include <stdint.h>

#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0 && __FLT_EVAL_METHOD__ != 16
/* Excess precision (x87) would round differently from torch's float32 ops. */
#error "float arithmetic must be evaluated in float (FLT_EVAL_METHOD 0), e.g. with SSE2"
#endif

#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HALF_F16C 1
#elif defined(__aarch64__)
#define HALF_NATIVE 1
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };
#define BLOCK 1024

static inline uint32_t bits_of(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = bits_of(f);
    if (f != f) return 0xFFFF; /* torch's NaN */
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#if !defined(HALF_F16C) && !defined(HALF_NATIVE)
/* Software float16, as F16C and FCVT compute it (round to nearest even, the
 * default rounding mode, no flush to zero). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F) /* inf; NaN quieted, payload kept */
        return float_of(sign | 0x7F800000 | (mantissa ? 0x400000 | (mantissa << 13) : 0));
    if (exponent != 0) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
    /* zero or subnormal: mantissa * 2^-24, exact in float */
    return float_of(sign | bits_of((float)mantissa * 5.9604644775390625e-8f));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = bits_of(f);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFF;
    if (a > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((a >> 13) & 0x3FF)); /* NaN */
    if (a >= 0x47800000) return (uint16_t)(sign | 0x7C00); /* >= 2^16: inf */
    if (a < 0x38800000) {
        /* below 2^-14: adding 0.5 puts the float16 subnormal's bits, rounded to
           nearest even by the FPU, at the bottom of the mantissa. */
        return (uint16_t)(sign | (bits_of(float_of(a) + 0.5f) - 0x3F000000));
    }
    /* normal: rebias the exponent, round the 13 dropped bits to nearest even; a
       carry out of the mantissa correctly bumps the exponent (up to inf). */
    a += 0xC8000FFF + ((a >> 13) & 1); /* (15 - 127) << 23, plus 0xFFF */
    return (uint16_t)(sign | (a >> 13));
}
#endif

static void load_f16(const uint16_t *s, int64_t n, float *dst) {
    int64_t j = 0;
#if defined(HALF_F16C)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
    for (; j < n; j++) dst[j] = _cvtsh_ss(s[j]);
#elif defined(HALF_NATIVE)
    const _Float16 *h = (const _Float16 *)s;
    for (; j < n; j++) dst[j] = (float)h[j];
#else
    for (; j < n; j++) dst[j] = f16_to_f32(s[j]);
#endif
}

static void store_f16(uint16_t *o, int64_t n, const float *src) {
    int64_t j = 0;
#if defined(HALF_F16C)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(o + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; j++) o[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
#elif defined(HALF_NATIVE)
    _Float16 *h = (_Float16 *)o;
    for (; j < n; j++) h[j] = (_Float16)src[j];
#else
    for (; j < n; j++) o[j] = f32_to_f16(src[j]);
#endif
}

static void round_trip_f16(float *a, int64_t n) {
    int64_t j = 0;
#if defined(HALF_F16C)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(a + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(a + j),
                                                                 _MM_FROUND_TO_NEAREST_INT)));
    for (; j < n; j++) a[j] = _cvtsh_ss(_cvtss_sh(a[j], _MM_FROUND_TO_NEAREST_INT));
#elif defined(HALF_NATIVE)
    for (; j < n; j++) a[j] = (float)(_Float16)a[j];
#else
    for (; j < n; j++) a[j] = f16_to_f32(f32_to_f16(a[j]));
#endif
}

static void load(const void *src, int dtype, int64_t i, int64_t n, float *dst) {
    if (dtype == F32) {
        __builtin_memcpy(dst, (const float *)src + i, n * sizeof(float));
    } else if (dtype == F16) {
        load_f16((const uint16_t *)src + i, n, dst);
    } else {
        const uint16_t *s = (const uint16_t *)src + i;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    }
}

static void store(void *out, int dtype, int64_t i, int64_t n, const float *src) {
    if (dtype == F32) {
        __builtin_memcpy((float *)out + i, src, n * sizeof(float));
    } else if (dtype == F16) {
        store_f16((uint16_t *)out + i, n, src);
    } else {
        uint16_t *o = (uint16_t *)out + i;
        for (int64_t j = 0; j < n; j++) o[j] = f32_to_bf16(src[j]);
    }
}

static void round_trip(float *a, int dtype, int64_t n) {
    if (dtype == F16) {
        round_trip_f16(a, n);
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
