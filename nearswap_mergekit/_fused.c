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

static void stage(float *restrict a, const float *restrict b, float t, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float d = __builtin_fabsf(a[j] - b[j]); /* clears the sign bit: |-0| = +0 */
        float w = t / d;
        w = (w <= 1.0f) ? w : 1.0f; /* NaN, +inf and > 1 -> 1; w >= 0 always */
        float x = (1.0f - w) * a[j];
        float y = w * b[j];
        float r = x + y;
        a[j] = (x != x) ? x : r; /* keep numpy's operand order for two NaNs */
    }
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
