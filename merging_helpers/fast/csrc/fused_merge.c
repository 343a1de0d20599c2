/* The compiled fused merge: the CPU fast path of merging_helpers.fast.streaming.
 *
 * merge_piece() merges the n entries of one piece of a flattened tensor (a whole
 * random block, rng.BLOCK entries, or less) with the float32 operations of
 * recipes.merge_tensor, in the same order, so the result is bit-identical to it
 * (tests compare them).  It works through the piece in tiles of TILE entries that
 * stay in the L1 cache:
 *
 *   1. deltas    D_t = float(expert_t) - float(base)
 *   2. drop      D_t = D_t * keep_t            keep: |D_t| > thr_t (magnitude) or the
 *                                              DARE word of the entry >= its threshold
 *   3. rescale   D_t = D_t / divisor_t         (1 - p for DARE)
 *   4. combine   Task Arithmetic: M = sum_t w_t D_t
 *                TIES: elect s = sign(sum_t V_t), keep the agreeing D_t, sum or mean
 *   5. finish    out = dtype(base + lam * M)   (round to nearest even)
 *
 * DARE words (see rng.py): the high byte of entry i is byte i % 8 of the (i / 8)-th
 * output of numpy's PCG64 stream of the block (state and increment come from numpy);
 * the low 24 bits are SplitMix64's output function at (key, i), needed only where the
 * high byte equals the threshold's top byte.
 *
 * Build without -ffast-math and with -ffp-contract=off: either would change rounding.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAXT 16
#define TILE 512 /* a multiple of 8: a tile takes whole PCG64 outputs */

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { DROP_NONE = 0, DROP_MAGNITUDE = 1, DROP_RANDOM = 2 };
enum { MODE_SUM = 0, MODE_MEAN = 1, MODE_WEIGHTED_MEAN = 2 };

typedef struct {
    int64_t n;
    int32_t T, dtype;
    const void *base;
    const void *experts[MAXT];
    void *out;
    /* drop */
    int32_t drop;
    float thr[MAXT];        /* magnitude: keep |D| > thr ...                          */
    float tie_value[MAXT];  /* ... and the first tie_allow entries with |D| == tie_value */
    int64_t tie_allow[MAXT];
    uint64_t pcg_state[MAXT][2], pcg_inc[MAXT][2]; /* random: (high, low) 64-bit halves */
    uint64_t key[MAXT];
    uint32_t t_hi[MAXT], t_lo[MAXT]; /* keep word w >= t_hi * 2^24 + t_lo */
    /* rescale, weights, consensus */
    int32_t rescale;
    float divisor[MAXT];
    int32_t weighted;
    float w[MAXT];
    int32_t ties, elect_weighted, frequency, mode;
    float elect_w[MAXT];
    float lam;
    int64_t overflowed; /* out: entries of the piece that became inf in the output dtype */
} merge_args;

typedef unsigned __int128 u128;

/* ------------------------------------------------------------------ conversions */
static inline __attribute__((always_inline)) float to_f32(const void *src, const int dtype, int64_t i) {
    if (dtype == BF16) { /* the high half of a float32 */
        uint32_t u = (uint32_t)((const uint16_t *)src)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    if (dtype == F16) return (float)((const _Float16 *)src)[i];
    return ((const float *)src)[i];
}

static void load_f32(float *dst, const void *src, int dtype, int64_t at, int m) {
    if (dtype == F32) {
        memcpy(dst, (const float *)src + at, (size_t)m * sizeof(float));
    } else if (dtype == BF16) {
        for (int j = 0; j < m; j++) dst[j] = to_f32(src, BF16, at + j);
    } else {
        for (int j = 0; j < m; j++) dst[j] = to_f32(src, F16, at + j);
    }
}

/* stores m values; returns how many of the stored values are inf or NaN (the inputs are
   finite, so these overflowed the output dtype) */
static int64_t store_from_f32(void *dst, const float *src, int dtype, int64_t at, int m) {
    int64_t bad = 0;
    if (dtype == F32) {
        memcpy((float *)dst + at, src, (size_t)m * sizeof(float));
        for (int j = 0; j < m; j++) bad += !(__builtin_fabsf(src[j]) <= 3.40282347e+38f);
    } else if (dtype == BF16) { /* as torch's round_to_nearest_even */
        uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < m; j++) {
            uint32_t u;
            memcpy(&u, src + j, 4);
            uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            d[j] = src[j] != src[j] ? (uint16_t)0x7FC0 : r; /* NaN */
            bad += (d[j] & 0x7F80u) == 0x7F80u;
        }
    } else {
        _Float16 *d = (_Float16 *)dst + at;
        uint16_t h;
        for (int j = 0; j < m; j++) {
            d[j] = (_Float16)src[j];
            memcpy(&h, d + j, 2);
            bad += (h & 0x7C00u) == 0x7C00u;
        }
    }
    return bad;
}

/* ------------------------------------------------------------------ DARE words */
static inline uint64_t pcg64_next(u128 *state, u128 inc) {
    static const u128 MULT = ((u128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;
    *state = *state * MULT + inc;
    uint64_t hi = (uint64_t)(*state >> 64), lo = (uint64_t)*state;
    unsigned rot = (unsigned)(*state >> 122);
    uint64_t x = hi ^ lo;
    return (x >> rot) | (x << ((64 - rot) & 63));
}

static inline uint32_t low_word(uint64_t key, uint64_t pos) { /* rng.low_words */
    uint64_t x = key + (pos + 1) * 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return (uint32_t)(x >> 40);
}

/* the high bytes of the next m words of every expert's stream: hb[t][j] is byte j % 8
   of output j / 8.  Two generators are stepped together, in registers, so that their
   (serial) 128-bit multiplications overlap */
static void high_bytes(uint8_t hb[][TILE], u128 *state, const u128 *inc, int T, int m) {
    int t = 0;
    for (; t + 1 < T; t += 2) {
        u128 s0 = state[t], s1 = state[t + 1];
        for (int j = 0; j < m; j += 8) {
            uint64_t r0 = pcg64_next(&s0, inc[t]), r1 = pcg64_next(&s1, inc[t + 1]);
            memcpy(&hb[t][j], &r0, 8); /* little-endian: lowest byte first */
            memcpy(&hb[t + 1][j], &r1, 8);
        }
        state[t] = s0, state[t + 1] = s1;
    }
    if (t < T) {
        u128 s0 = state[t];
        for (int j = 0; j < m; j += 8) {
            uint64_t r0 = pcg64_next(&s0, inc[t]);
            memcpy(&hb[t][j], &r0, 8);
        }
        state[t] = s0;
    }
}

/* keep[j] = 1.0f where the word of entry pos + j is >= t_hi * 2^24 + t_lo, else 0.0f */
static void random_keep(float *keep, const uint8_t *hb, uint64_t key, uint32_t t_hi, uint32_t t_lo,
                        int64_t pos, int m) {
    if (t_hi >= 256) {
        for (int j = 0; j < m; j++) keep[j] = 0.0f;
        return;
    }
    const uint8_t th = (uint8_t)t_hi;
    if (t_lo == 0) {
        for (int j = 0; j < m; j++) keep[j] = hb[j] >= th ? 1.0f : 0.0f;
        return;
    }
    for (int j = 0; j < m; j++) keep[j] = hb[j] > th ? 1.0f : 0.0f;
    /* where hb == th (1 entry in 256) the low bits decide: find those entries 32 (AVX2)
       or 8 bytes at a time, so the hash runs only there */
    int j = 0;
#ifdef __AVX2__
    const __m256i pattern32 = _mm256_set1_epi8((char)th);
    for (; j + 32 <= m; j += 32) {
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(hb + j));
        for (uint32_t eq = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, pattern32)); eq; eq &= eq - 1) {
            int i = j + __builtin_ctz(eq);
            keep[i] = low_word(key, (uint64_t)(pos + i)) >= t_lo ? 1.0f : 0.0f;
        }
    }
#endif
    /* z has bit 7 set in each byte of x = bytes ^ th that is zero (and maybe in bytes above one) */
    const uint64_t ones = 0x0101010101010101ULL, pattern = ones * th;
    for (; j < m; j += 8) {
        uint64_t x;
        memcpy(&x, hb + j, 8);
        x ^= pattern;
        for (uint64_t z = (x - ones) & ~x & (ones << 7); z; z &= z - 1) {
            int i = j + (__builtin_ctzll(z) >> 3);
            if (i < m && hb[i] == th) keep[i] = low_word(key, (uint64_t)(pos + i)) >= t_lo ? 1.0f : 0.0f;
        }
    }
}

/* keep[j] = 1.0f where |d[j]| > thr, and at the first *allow entries with |d[j]| == tie
   (the threshold's ties kept in flat order), else 0.0f */
static void magnitude_keep(float *restrict keep, const float *restrict d, float thr, float tie, int64_t *allow,
                           int m) {
    for (int j = 0; j < m; j++) keep[j] = __builtin_fabsf(d[j]) > thr ? 1.0f : 0.0f;
    for (int j = 0; *allow > 0 && j < m; j++) {
        if (__builtin_fabsf(d[j]) == tie && keep[j] == 0.0f) {
            keep[j] = 1.0f;
            (*allow)--;
        }
    }
}

/* d = (d * keep) / divisor (the division only if rescale), in place */
static void drop_rescale(float *restrict d, const float *restrict keep, float divisor, int rescale, int m) {
    if (rescale)
        for (int j = 0; j < m; j++) d[j] = (d[j] * keep[j]) / divisor;
    else
        for (int j = 0; j < m; j++) d[j] *= keep[j];
}

/* steps 1.-3. for one expert in one pass over the tile: D = ((float(expert) - base) *
   keep) / divisor, with keep = 1 everywhere (keep NULL) or keep[j], the division only if
   rescale.  Returns 0 if an expert entry is not finite.  Called with constant dtype,
   (keep != NULL) and rescale: one vectorised loop each.  (A magnitude keep computed
   inline, v * (|v| > thr), is not vectorised by gcc: it stays a loop of its own.) */
static inline __attribute__((always_inline)) int expert_deltas(float *restrict d, const void *src, const int dtype,
                                                               int64_t at, const float *restrict bf,
                                                               const float *restrict keep, const int rescale,
                                                               float divisor, int m) {
    int ok = 1;
    for (int j = 0; j < m; j++) {
        const float x = to_f32(src, dtype, at + j);
        ok &= __builtin_fabsf(x) <= 3.40282347e+38f;
        float v = x - bf[j];
        if (keep) v *= keep[j];
        if (rescale) v /= divisor;
        d[j] = v;
    }
    return ok;
}

static int expert_deltas_any(float *d, const void *src, int dtype, int64_t at, const float *bf, const float *keep,
                             int rescale, float divisor, int m) {
#define CASES(DT)                                                                                         \
    case DT:                                                                                              \
        if (keep) return rescale ? expert_deltas(d, src, DT, at, bf, keep, 1, divisor, m)                 \
                                 : expert_deltas(d, src, DT, at, bf, keep, 0, divisor, m);                \
        return rescale ? expert_deltas(d, src, DT, at, bf, NULL, 1, divisor, m)                            \
                       : expert_deltas(d, src, DT, at, bf, NULL, 0, divisor, m);
    switch (dtype) {
        CASES(BF16)
        CASES(F16)
        CASES(F32)
    }
#undef CASES
    return 0;
}

/* ------------------------------------------------------------------ helpers */
static void sum_rows(float *out, float rows[][TILE], int T, int m) { /* in expert order */
    for (int j = 0; j < m; j++) out[j] = rows[0][j];
    for (int t = 1; t < T; t++)
        for (int j = 0; j < m; j++) out[j] += rows[t][j];
}

static void scale_row(float *row, float s, int m) {
    for (int j = 0; j < m; j++) row[j] *= s;
}

static void divide_by_count(float *M, float *cnt, int m) { /* M / max(cnt, 1) */
    for (int j = 0; j < m; j++) cnt[j] = cnt[j] < 1.0f ? 1.0f : cnt[j];
    for (int j = 0; j < m; j++) M[j] /= cnt[j];
}

/* TIES without weights: elect s = sign(sum_t V_t) (a sum of +0 elects +1), then
   M = s * sum_t max(s D_t, 0) (the sum of the agreeing D_t) and, if mean, the number of
   agreeing experts; the sums run in expert order */
static inline __attribute__((always_inline)) void agreeing_sum(float *restrict M, float *restrict count,
                                                               float (*V)[TILE], float (*D)[TILE], int mean,
                                                               const int T, int m) {
    for (int j = 0; j < m; j++) {
        float v = V[0][j];
        for (int t = 1; t < T; t++) v += V[t][j];
        const float s = __builtin_copysignf(1.0f, v);
        float x = D[0][j] * s; /* > 0 where expert 0 agrees */
        float cnt = x > 0.0f ? 1.0f : 0.0f;
        float sum = x < 0.0f ? 0.0f : x; /* torch.clamp_min: keeps -0 */
        for (int t = 1; t < T; t++) {
            x = D[t][j] * s;
            cnt += x > 0.0f ? 1.0f : 0.0f;
            sum += x < 0.0f ? 0.0f : x;
        }
        M[j] = sum * s;
        if (mean) count[j] = cnt;
    }
}

/* 1 if every entry is finite (not NaN, not +-inf): the check the reference makes on its inputs */
static int all_finite(const float *x, int m) {
    int ok = 1;
    for (int j = 0; j < m; j++) ok &= __builtin_fabsf(x[j]) <= 3.40282347e+38f;
    return ok;
}

/* ------------------------------------------------------------------ one piece */
/* returns 0; -1 for a bad T; -2 for a non-finite base entry; -(10 + t) for one of expert t */
int merge_piece(merge_args *a) {
    const int T = a->T;
    int64_t overflowed = 0;
    if (T < 1 || T > MAXT) return -1;
    float bf[TILE], M[TILE], s[TILE], cnt[TILE];
    float D[MAXT][TILE], A[MAXT][TILE];
    uint8_t hb[MAXT][TILE];
    u128 state[MAXT], inc[MAXT];
    int64_t allow[MAXT];
    for (int t = 0; t < T; t++) {
        state[t] = ((u128)a->pcg_state[t][0] << 64) | a->pcg_state[t][1];
        inc[t] = ((u128)a->pcg_inc[t][0] << 64) | a->pcg_inc[t][1];
        allow[t] = a->tie_allow[t];
    }

    for (int64_t at = 0; at < a->n; at += TILE) {
        const int m = (int)(a->n - at < TILE ? a->n - at : TILE);

        /* 1.-3. deltas, drop, rescale */
        load_f32(bf, a->base, a->dtype, at, m);
        if (!all_finite(bf, m)) return -2;
        if (a->drop == DROP_RANDOM) high_bytes(hb, state, inc, T, m);
        for (int t = 0; t < T; t++) {
            float *d = D[t], *k = A[t];
            const void *e = a->experts[t];
            int ok;
            if (a->drop == DROP_MAGNITUDE) {
                ok = expert_deltas_any(d, e, a->dtype, at, bf, NULL, 0, 1.0f, m);
                magnitude_keep(k, d, a->thr[t], a->tie_value[t], &allow[t], m);
                drop_rescale(d, k, a->divisor[t], a->rescale, m);
            } else if (a->drop == DROP_RANDOM) {
                random_keep(k, hb[t], a->key[t], a->t_hi[t], a->t_lo[t], at, m);
                ok = expert_deltas_any(d, e, a->dtype, at, bf, k, a->rescale, a->divisor[t], m);
            } else {
                ok = expert_deltas_any(d, e, a->dtype, at, bf, NULL, a->rescale, a->divisor[t], m);
            }
            if (!ok) return -(10 + t);
        }

        /* 4. combine */
        if (!a->ties) { /* M = sum_t w_t D_t */
            if (a->weighted)
                for (int t = 0; t < T; t++) scale_row(D[t], a->w[t], m);
            sum_rows(M, D, T, m);
        } else {
            /* the election votes V_t: D_t, w_t D_t (mergekit) or their signs ("frequency") */
            float (*V)[TILE] = D;
            if (a->elect_weighted || a->frequency) {
                for (int t = 0; t < T; t++) {
                    memcpy(A[t], D[t], (size_t)m * sizeof(float));
                    if (a->elect_weighted) scale_row(A[t], a->elect_w[t], m);
                    if (a->frequency)
                        for (int j = 0; j < m; j++) A[t][j] = (float)(0.0f < A[t][j]) - (float)(A[t][j] < 0.0f);
                }
                V = A;
            }
            if (!a->weighted && (a->mode == MODE_SUM || a->mode == MODE_MEAN)) {
                const int mean = a->mode == MODE_MEAN;
                switch (T) { /* a constant T unrolls the expert loop: one vectorised pass */
                case 2: agreeing_sum(M, cnt, V, D, mean, 2, m); break;
                case 3: agreeing_sum(M, cnt, V, D, mean, 3, m); break;
                case 4: agreeing_sum(M, cnt, V, D, mean, 4, m); break;
                default: agreeing_sum(M, cnt, V, D, mean, T, m);
                }
                if (mean) divide_by_count(M, cnt, m);
            } else {
                sum_rows(M, V, T, m);
                for (int j = 0; j < m; j++) s[j] = __builtin_copysignf(1.0f, M[j]); /* a sum of +0 elects +1 */
                for (int t = 0; t < T; t++)
                    for (int j = 0; j < m; j++) A[t][j] = D[t][j] * s[j] > 0.0f ? 1.0f : 0.0f; /* agrees */
                for (int t = 0; t < T; t++) {
                    if (a->weighted) scale_row(D[t], a->w[t], m);
                    for (int j = 0; j < m; j++) D[t][j] *= A[t][j];
                }
                sum_rows(M, D, T, m); /* sum over agreeing t of w_t D_t */
                if (a->mode == MODE_MEAN) {
                    sum_rows(cnt, A, T, m);
                    divide_by_count(M, cnt, m);
                } else if (a->mode == MODE_WEIGHTED_MEAN) {
                    for (int t = 0; t < T; t++) scale_row(A[t], a->w[t], m);
                    sum_rows(cnt, A, T, m);
                    for (int j = 0; j < m; j++) { /* as consensus.disjoint_merge: |sum| < 1e-8 divides by 1 */
                        cnt[j] = __builtin_fabsf(cnt[j]) < 1e-8f ? 1.0f : cnt[j];
                    }
                    for (int j = 0; j < m; j++) M[j] /= cnt[j];
                }
            }
        }

        /* 5. finish */
        if (a->lam != 1.0f) scale_row(M, a->lam, m);
        for (int j = 0; j < m; j++) M[j] += bf[j];
        overflowed += store_from_f32(a->out, M, a->dtype, at, m);
    }
    a->overflowed = overflowed;
    return 0;
}

/* ------------------------------------------------------------------ top-k bracket scan */
/* The one pass of the fused path's exact top-k threshold (fast.fused.FusedMerge._topk), for
 * the n entries of one piece: for every expert t, above[t] = the number of entries with
 * |D_t| > hi[t], and cands[t][0 .. count[t]) = the |D_t| in [lo[t], hi[t]], in order.
 * It writes up to SCAN_PAST entries past the last candidate: returns -1 (and stops) if a
 * whole tile might not fit in cap entries (checked before each tile; never with
 * cap >= n + SCAN_PAST), else 0. */
#define SCAN_PAST 8

#ifdef __AVX2__
/* 8 entries of src from index at, as float32 */
static inline __attribute__((always_inline)) __m256 load8(const void *src, const int dtype, int64_t at) {
    if (dtype == BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at))), 16));
    if (dtype == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at)));
    return _mm256_loadu_ps((const float *)src + at);
}

/* COMPRESS[bits]: the positions of the set bits of an 8-bit mask, lowest first, 4 bits
   each (unused nibbles 0): the lane order that packs the selected lanes to the front */
static uint32_t COMPRESS[256];
__attribute__((constructor)) static void build_compress_table(void) {
    for (int bits = 0; bits < 256; bits++) {
        uint32_t packed = 0;
        for (int i = 0, k = 0; i < 8; i++)
            if (bits >> i & 1) packed |= (uint32_t)i << (4 * k++);
        COMPRESS[bits] = packed;
    }
}

/* the first m8 (a multiple of 8) entries of a tile: returns how many |D| > h, copies
   the |D| in [l, h] to c[*k ...] (in order; it writes up to 8 floats past the last) and
   adds their number to *k.  No branches on the data: a few % of the entries are
   inside, at places no branch predictor can guess */
static inline __attribute__((always_inline)) int64_t scan8(const float *bf, const void *e, const int dtype, int64_t at,
                                                           float l, float h, float *c, int64_t *k, int m8) {
    const __m256 L = _mm256_set1_ps(l), H = _mm256_set1_ps(h);
    const __m256 ABS = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i SHIFTS = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), NIBBLE = _mm256_set1_epi32(0xF);
    __m256i above = _mm256_setzero_si256(); /* per lane: minus the count (a true compare is -1) */
    int64_t kk = *k;
    for (int j = 0; j < m8; j += 8) {
        __m256 v = _mm256_and_ps(_mm256_sub_ps(load8(e, dtype, at + j), _mm256_loadu_ps(bf + j)), ABS);
        above = _mm256_add_epi32(above, _mm256_castps_si256(_mm256_cmp_ps(v, H, _CMP_GT_OQ)));
        unsigned bits = (unsigned)_mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, L, _CMP_GE_OQ), _mm256_cmp_ps(v, H, _CMP_LE_OQ)));
        __m256i order = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)COMPRESS[bits]), SHIFTS), NIBBLE);
        _mm256_storeu_ps(c + kk, _mm256_permutevar8x32_ps(v, order));
        kk += __builtin_popcount(bits);
    }
    *k = kk;
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, above);
    int64_t n = 0;
    for (int i = 0; i < 8; i++) n -= lanes[i];
    return n;
}
#endif

int bracket_scan(const merge_args *a, const float *lo, const float *hi, int64_t *above, float **cands,
                 int64_t *count, int64_t cap) {
    const int T = a->T;
    if (T < 1 || T > MAXT) return -1;
    float bf[TILE], d[TILE];
    for (int t = 0; t < T; t++) above[t] = count[t] = 0;
    for (int64_t at = 0; at < a->n; at += TILE) {
        const int m = (int)(a->n - at < TILE ? a->n - at : TILE);
        load_f32(bf, a->base, a->dtype, at, m);
        for (int t = 0; t < T; t++) {
            if (count[t] + m + SCAN_PAST > cap) return -1;
            const float l = lo[t], h = hi[t];
            float *c = cands[t] + count[t];
            int64_t k = 0;
            int j = 0;
#ifdef __AVX2__
            const int m8 = m & ~7;
            switch (a->dtype) { /* a constant dtype: one loop per case */
            case BF16: above[t] += scan8(bf, a->experts[t], BF16, at, l, h, c, &k, m8); break;
            case F16: above[t] += scan8(bf, a->experts[t], F16, at, l, h, c, &k, m8); break;
            default: above[t] += scan8(bf, a->experts[t], F32, at, l, h, c, &k, m8);
            }
            j = m8;
#endif
            if (j < m) {
                load_f32(d, a->experts[t], a->dtype, at + j, m - j);
                for (int i = 0; i < m - j; i++) { /* branch-free: always write, advance where inside */
                    float v = __builtin_fabsf(d[i] - bf[j + i]);
                    above[t] += v > h;
                    c[k] = v;
                    k += (v >= l) & (v <= h);
                }
            }
            count[t] += k;
        }
    }
    return 0;
}
