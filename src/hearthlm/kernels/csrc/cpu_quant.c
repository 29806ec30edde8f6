/* y = x @ W^T on CPU for group-quantized W (groups of 32 inputs, w = code * scale + min, codes unsigned) with
 * x quantized to int8 on the fly (llama.cpp's Q8 trade, with a scale per 16 inputs: +0.5% perplexity on
 * SmolLM2-135M), u8 x s8 dot products: AVX-512 VNNI vpdpbusd (HL_VNNI), AVX2 (HL_AVX2: vpdpbusd on 256-bit
 * registers with AVX-VNNI, else vpmaddubsw + vpmaddwd), a portable C loop elsewhere (a test reference).
 *
 * Layout (kernels/cpu_quant.py packs it): W in tiles of 16 output rows; per tile and group, "vector" j (j = 0..7)
 * holds 64 bytes, 4 codes (inputs 32 g + 4 j .. + 3) of each of the tile's 16 rows: lane n of a 512-bit register.
 * One vpdpbusd against x's 4 inputs broadcast adds 4 products to each row's lane, so a group's 8 vectors leave
 * 16 rows' dot products in one register (two: inputs 0-15 and 16-31 have their own x scale) and the float work is
 * a few ops per group, 16 rows and row of x; no horizontal sums. (AVX2 takes each vector's halves, rows 0-7 and
 * 8-15, in 256-bit registers.)
 *   bits 8: the 8 vectors stored as is;
 *   bits 4: vectors i and i + 4 share 64 bytes, in the low and high nibbles (i = 0..3).
 * scale, min: fp16 [N / 16][G][16] (a tile's 16 rows side by side). x is quantized per row in natural order with a
 * scale dx = absmax / 127 per 16 inputs and the plain float sum xs per group of 32 (the min term: min * xs).
 *
 * The AVX2 path gives the AVX-512 path's bits: its integer sums are exact (no int16 saturation: see tile_rows8),
 * and every float sum runs in the same order, lane for lane (a 512-bit register's work as two 256-bit halves,
 * horizontal sums in _mm512_reduce_add_ps' tree: hsum8), with the same fused multiply-adds.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__) && \
    !defined(HEARTH_PORTABLE)
#define HL_VNNI 1
#else
#define HL_VNNI 0
#endif
#if !HL_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(HEARTH_PORTABLE)
#define HL_AVX2 1
#else
#define HL_AVX2 0
#endif
#if HL_VNNI || HL_AVX2
#include <immintrin.h>
#endif
/* u8 x s8 dot products of 4 into int32 lanes on 256-bit registers: AVX-VNNI (Intel since Alder Lake), or AVX-512
 * VNNI + VL (an AVX2 build given -mavx512vnni -mavx512vl: the tests' way to run this branch on an AVX-512 CPU) */
#if HL_AVX2 && defined(__AVXVNNI__)
#define HL_DP256(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif HL_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HL_DP256(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif

#define GROUP 32
#define TILE 16  /* output rows per tile */
#define MAX_ROWS 6 /* rows of x per pass over a tile */

/* The build's dot-product path: 1 AVX-512 VNNI, 2 AVX2 (vpmaddubsw), 3 AVX2 with 256-bit vpdpbusd, 0 portable. */
int hl_simd(void) {
#if HL_VNNI
    return 1;
#elif HL_AVX2 && defined(HL_DP256)
    return 3;
#elif HL_AVX2
    return 2;
#else
    return 0;
#endif
}

#if HL_VNNI || HL_AVX2
/* The sum of 8 floats in the tree GCC's _mm512_reduce_add_ps takes after its first step (the halves' sum): both
 * paths sum through it, so that they agree whatever the compiler's own reduction order. */
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    a = _mm_add_ps(a, _mm_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(a) + _mm_cvtss_f32(_mm_shuffle_ps(a, a, _MM_SHUFFLE(1, 1, 1, 1)));
}
#endif
#if HL_VNNI
static inline float hsum16(__m512 v) {
    return hsum8(_mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                               _mm512_castps512_ps256(v)));
}
#endif
#if HL_AVX2
static inline float hmax8(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    a = _mm_max_ps(a, _mm_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    return fmaxf(_mm_cvtss_f32(a), _mm_cvtss_f32(_mm_shuffle_ps(a, a, _MM_SHUFFLE(1, 1, 1, 1))));
}
static inline int32_t hsum_epi32(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xB1));
    return _mm_cvtsi128_si32(a);
}
static inline __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
/* four int32 vectors (16 + 16 values in [-128, 127]) -> 32 int8, in order */
static inline __m256i pack_epi8(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

/* Threads of this kernel's parallel regions (runtime/threads.py sets it with torch's): an explicit num_threads
 * clause, as OpenMP keeps the default count per calling thread. 0: that default. */
static int hl_nthreads = 0;
void hl_set_threads(int n) { hl_nthreads = n > 0 ? n : 0; }
#ifdef _OPENMP
static int team(void) { return hl_nthreads > 0 ? hl_nthreads : omp_get_max_threads(); }
#else
static __attribute__((unused)) int team(void) { return 1; }
#endif
/* The team a parallel region of this kernel gets on the calling thread (tests). */
int hl_team_size(void) {
    int n = 1;
#pragma omp parallel num_threads(team())
    {
#ifdef _OPENMP
#pragma omp single
        n = omp_get_num_threads();
#endif
    }
    return n;
}

static __attribute__((unused)) float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { float f = ldexpf((float)man, -24); return sign ? -f : f; }
    } else if (exp == 31) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 112) << 23) | (man << 13); }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x [K] float -> xq [K] int8, dx [G][2] (the halves' scales), xs [G]. With xr (the residual pass), also the
 * rounding residuals in 1/128ths of a step: x = dx * (xq + xr / 128) to within dx / 256, and dx is stored / 128.
 * xsq [G][2] (AVX2): the halves' integer sums of xq. */
static void quantize_row(const float *x, int64_t K, int8_t *xq, int8_t *xr, float *dx, float *xs, int32_t *xsq) {
    const float dscale = xr ? 1.f / 128 : 1.f;
    (void)xsq;
    for (int64_t g = 0; g < K / GROUP; g++) {
        const float *v = x + g * GROUP;
#if HL_VNNI
        __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
        float amax_a = _mm512_reduce_max_ps(_mm512_abs_ps(a)), amax_b = _mm512_reduce_max_ps(_mm512_abs_ps(b));
        xs[g] = hsum16(_mm512_add_ps(a, b));
        dx[2 * g] = amax_a / 127.f * dscale;
        dx[2 * g + 1] = amax_b / 127.f * dscale;
        __m512 va = _mm512_mul_ps(a, _mm512_set1_ps(amax_a > 0.f ? 127.f / amax_a : 0.f));
        __m512 vb = _mm512_mul_ps(b, _mm512_set1_ps(amax_b > 0.f ? 127.f / amax_b : 0.f));
        __m512 ra = _mm512_roundscale_ps(va, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 rb = _mm512_roundscale_ps(vb, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(xq + g * GROUP), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(ra)));
        _mm_storeu_si128((__m128i *)(xq + g * GROUP + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(rb)));
        if (xr) {
            const __m512 k128 = _mm512_set1_ps(128.f);
            _mm_storeu_si128((__m128i *)(xr + g * GROUP),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(va, ra), k128))));
            _mm_storeu_si128((__m128i *)(xr + g * GROUP + 16),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(vb, rb), k128))));
        }
#elif HL_AVX2 /* the VNNI path's a and b as (a0, a1) and (b0, b1): inputs 0-7, 8-15 and 16-23, 24-31 */
        __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8);
        __m256 b0 = _mm256_loadu_ps(v + 16), b1 = _mm256_loadu_ps(v + 24);
        float amax_a = hmax8(_mm256_max_ps(abs8(a0), abs8(a1))), amax_b = hmax8(_mm256_max_ps(abs8(b0), abs8(b1)));
        xs[g] = hsum8(_mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(a0, b0)));
        dx[2 * g] = amax_a / 127.f * dscale;
        dx[2 * g + 1] = amax_b / 127.f * dscale;
        const __m256 ia = _mm256_set1_ps(amax_a > 0.f ? 127.f / amax_a : 0.f);
        const __m256 ib = _mm256_set1_ps(amax_b > 0.f ? 127.f / amax_b : 0.f);
        __m256 va0 = _mm256_mul_ps(a0, ia), va1 = _mm256_mul_ps(a1, ia);
        __m256 vb0 = _mm256_mul_ps(b0, ib), vb1 = _mm256_mul_ps(b1, ib);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256 ra0 = _mm256_round_ps(va0, rnd), ra1 = _mm256_round_ps(va1, rnd);
        __m256 rb0 = _mm256_round_ps(vb0, rnd), rb1 = _mm256_round_ps(vb1, rnd);
        __m256i qa0 = _mm256_cvtps_epi32(ra0), qa1 = _mm256_cvtps_epi32(ra1);
        __m256i qb0 = _mm256_cvtps_epi32(rb0), qb1 = _mm256_cvtps_epi32(rb1);
        _mm256_storeu_si256((__m256i *)(xq + g * GROUP), pack_epi8(qa0, qa1, qb0, qb1));
        xsq[2 * g] = hsum_epi32(_mm256_add_epi32(qa0, qa1));
        xsq[2 * g + 1] = hsum_epi32(_mm256_add_epi32(qb0, qb1));
        if (xr) {
            const __m256 k128 = _mm256_set1_ps(128.f);
#define HL_RES(V, R) _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(V, R), k128))
            _mm256_storeu_si256((__m256i *)(xr + g * GROUP),
                                pack_epi8(HL_RES(va0, ra0), HL_RES(va1, ra1), HL_RES(vb0, rb0), HL_RES(vb1, rb1)));
#undef HL_RES
        }
#else
        float sum = 0.f;
        for (int i = 0; i < GROUP; i++) sum += v[i];
        xs[g] = sum;
        for (int half = 0; half < 2; half++) {
            const float *u = v + 16 * half;
            float amax = 0.f;
            for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(u[i]));
            float inv = amax > 0.f ? 127.f / amax : 0.f;
            dx[2 * g + half] = amax / 127.f * dscale;
            for (int i = 0; i < 16; i++) {
                const float v = u[i] * inv, q = nearbyintf(v);
                xq[g * GROUP + 16 * half + i] = (int8_t)q;
                if (xr) xr[g * GROUP + 16 * half + i] = (int8_t)lrintf((v - q) * 128.f);
            }
        }
#endif
    }
}

#if HL_VNNI
/* e^x for x <= 0 (SiLU's e^-|g|, softmax): 2^n * p(r), |r| <= ln2 / 2, ~1e-7 relative error; 0 below -87. */
static inline __m512 exp_neg(__m512 x0) {
    __m512 x = _mm512_max_ps(x0, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x0, _mm512_set1_ps(-87.f), _CMP_GT_OQ), p, n); /* e^-inf = 0 */
}
#elif HL_AVX2
/* exp_neg on 8 lanes, the same ops; scalef's p * 2^n as a product with 2^n built from n (-126 <= n <= 0: normal) */
static inline __m256 exp_neg8(__m256 x0) {
    __m256 x = _mm256_max_ps(x0, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT |
                               _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, _mm256_cmp_ps(x0, _mm256_set1_ps(-87.f), _CMP_GT_OQ)); /* e^-inf = 0 */
}
#endif

enum { PRE_NONE = 0, PRE_RMSNORM = 1, PRE_SILU_MUL = 2 };

/* The matmul's input row: x itself, rms_norm(x) * w, or silu(x[:K]) * x[K:2K]; in tmp unless x as is. */
static const float *prepare_row(int pre, const float *x, int64_t K, const float *w, float eps, float *tmp) {
    if (pre == PRE_RMSNORM) {
        double ss = 0.0;
        for (int64_t i = 0; i < K; i++) ss += (double)x[i] * x[i];
        float r = 1.f / sqrtf((float)(ss / K) + eps);
        for (int64_t i = 0; i < K; i++) tmp[i] = w[i] * (x[i] * r);
        return tmp;
    }
    if (pre == PRE_SILU_MUL) {
        int64_t i = 0;
#if HL_VNNI
        for (; i + 16 <= K; i += 16) {
            __m512 g = _mm512_loadu_ps(x + i), u = _mm512_loadu_ps(x + K + i);
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g))); /* e^-|g| */
            /* sigmoid(g) = 1 / (1 + e^-g): for g < 0, e^g / (1 + e^g) */
            __m512 one = _mm512_set1_ps(1.f), den = _mm512_add_ps(one, e);
            const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 sig = _mm512_mask_div_ps(_mm512_div_ps(one, den), neg, e, den);
            _mm512_storeu_ps(tmp + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
        }
#elif HL_AVX2
        for (; i + 16 <= K; i += 16) /* 16 at a time as the VNNI path: its scalar tail (expf) is the same */
            for (int h = 0; h < 16; h += 8) {
                __m256 g = _mm256_loadu_ps(x + i + h), u = _mm256_loadu_ps(x + K + i + h);
                __m256 e = exp_neg8(_mm256_sub_ps(_mm256_setzero_ps(), abs8(g)));
                __m256 one = _mm256_set1_ps(1.f), den = _mm256_add_ps(one, e);
                __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
                __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, den), _mm256_div_ps(e, den), neg);
                _mm256_storeu_ps(tmp + i + h, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
            }
#endif
        for (; i < K; i++) tmp[i] = x[i] / (1.f + expf(-x[i])) * x[K + i];
        return tmp;
    }
    return x;
}

#if HL_VNNI
/* Rows m0 .. m0 + mt of x against tile t (rows 16 t .. 16 t + 15 of W): y[m, 16 t ..] (+)= ... */
static inline __attribute__((always_inline)) void tile_rows(
    const uint8_t *w, const uint16_t *sc, const uint16_t *mn, int64_t G, int bits, const int8_t *xq, const int8_t *xres,
    int64_t K, const float *dx, const float *xs, int mt, float *y, int64_t ldy, int accumulate) {
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < mt; r++) acc[r] = _mm512_setzero_ps();
    const int64_t gbytes = TILE * GROUP * bits / 8;
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = w + g * gbytes;
        __m512i d0[MAX_ROWS], d1[MAX_ROWS], e0[MAX_ROWS], e1[MAX_ROWS]; /* e: the residual pass */
        for (int r = 0; r < mt; r++) {
            d0[r] = d1[r] = e0[r] = e1[r] = _mm512_setzero_si512();
        }
        for (int i = 0; i < 4; i++) {
            __m512i lo, hi;
            if (bits == 4) {
                __m512i q = _mm512_loadu_si512(wg + 64 * i);
                lo = _mm512_and_si512(q, lo4);
                hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), lo4);
            } else {
                lo = _mm512_loadu_si512(wg + 64 * i);
                hi = _mm512_loadu_si512(wg + 64 * (i + 4));
            }
            for (int r = 0; r < mt; r++) {
                const int64_t at = r * K + g * GROUP + 4 * i;
                int32_t x0, x1;
                memcpy(&x0, xq + at, 4);
                memcpy(&x1, xq + at + 16, 4);
                d0[r] = _mm512_dpbusd_epi32(d0[r], lo, _mm512_set1_epi32(x0));
                d1[r] = _mm512_dpbusd_epi32(d1[r], hi, _mm512_set1_epi32(x1));
                if (xres) {
                    memcpy(&x0, xres + at, 4);
                    memcpy(&x1, xres + at + 16, 4);
                    e0[r] = _mm512_dpbusd_epi32(e0[r], lo, _mm512_set1_epi32(x0));
                    e1[r] = _mm512_dpbusd_epi32(e1[r], hi, _mm512_set1_epi32(x1));
                }
            }
        }
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * TILE)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn + g * TILE)));
        for (int r = 0; r < mt; r++) {
            const float *dxr = dx + r * 2 * G + 2 * g;
            if (xres) { /* 128 q + residual: < 2^31 (16 products of at most 255 * 127, times 128) */
                d0[r] = _mm512_add_epi32(_mm512_slli_epi32(d0[r], 7), e0[r]);
                d1[r] = _mm512_add_epi32(_mm512_slli_epi32(d1[r], 7), e1[r]);
            }
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d0[r]), _mm512_set1_ps(dxr[0]));
            t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1[r]), _mm512_set1_ps(dxr[1]), t);
            acc[r] = _mm512_fmadd_ps(t, s, acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r * G + g]), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) {
        float *yr = y + r * ldy;
        _mm512_storeu_ps(yr, accumulate ? _mm512_add_ps(acc[r], _mm512_loadu_ps(yr)) : acc[r]);
    }
}
#elif HL_AVX2
#define AVX2_ROWS 4 /* rows of x per pass over a half tile */
/* Rows m0 .. m0 + mt of x against 8 rows of a tile (the tile's rows 0-7 or 8-15: w, sc, mn and y at that half's
 * offset, + 32 bytes in each 64-byte vector, + 8 scales and outputs): y[m, ..8] (+)= ... The integer sums are
 * vpdpbusd's, exactly: with HL_DP256 vpdpbusd itself; else vpmaddubsw's int16 pairs never saturate here:
 *   4-bit codes: |pair| <= 2 * 15 * 127, and 4 pairs (8 products, < 2^15) summed in int16 before vpmaddwd;
 *   8-bit codes (0..255) against xq (|xq| <= 127): as (code - 128) * xq, |code - 128| <= 128 moved onto x's sign
 *     (|pair| <= 2 * 128 * 127 < 2^15), plus 128 * the half's sum of xq (xsq);
 *   residuals (|xr| <= 64): |pair| <= 2 * 255 * 64 < 2^15.
 * Then the VNNI path's float ops on each lane. */
static inline __attribute__((always_inline)) void tile_rows8(
    const uint8_t *w, const uint16_t *sc, const uint16_t *mn, int64_t G, int bits, const int8_t *xq,
    const int8_t *xres, int64_t K, const float *dx, const float *xs, const int32_t *xsq, int mt, float *y,
    int64_t ldy, int accumulate) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
#ifndef HL_DP256
    const __m256i ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
#endif
    __m256 acc[AVX2_ROWS];
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_ps();
    const int64_t gbytes = TILE * GROUP * bits / 8;
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = w + g * gbytes;
        __m256i d0[AVX2_ROWS], d1[AVX2_ROWS], e0[AVX2_ROWS], e1[AVX2_ROWS]; /* e: the residual pass */
        for (int r = 0; r < mt; r++) d0[r] = d1[r] = e0[r] = e1[r] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i lo, hi;
            if (bits == 4) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(wg + 64 * i));
                lo = _mm256_and_si256(q, lo4);
                hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
            } else {
                lo = _mm256_loadu_si256((const __m256i *)(wg + 64 * i));
                hi = _mm256_loadu_si256((const __m256i *)(wg + 64 * (i + 4)));
            }
#ifdef HL_DP256
            for (int r = 0; r < mt; r++) {
                const int64_t at = r * K + g * GROUP + 4 * i;
                int32_t x0, x1;
                memcpy(&x0, xq + at, 4);
                memcpy(&x1, xq + at + 16, 4);
                d0[r] = HL_DP256(d0[r], lo, _mm256_set1_epi32(x0));
                d1[r] = HL_DP256(d1[r], hi, _mm256_set1_epi32(x1));
                if (xres) {
                    memcpy(&x0, xres + at, 4);
                    memcpy(&x1, xres + at + 16, 4);
                    e0[r] = HL_DP256(e0[r], lo, _mm256_set1_epi32(x0));
                    e1[r] = HL_DP256(e1[r], hi, _mm256_set1_epi32(x1));
                }
            }
#else
            if (bits == 4) { /* int16 sums */
                for (int r = 0; r < mt; r++) {
                    const int64_t at = r * K + g * GROUP + 4 * i;
                    int32_t x0, x1;
                    memcpy(&x0, xq + at, 4);
                    memcpy(&x1, xq + at + 16, 4);
                    d0[r] = _mm256_add_epi16(d0[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                    d1[r] = _mm256_add_epi16(d1[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                    if (xres) {
                        memcpy(&x0, xres + at, 4);
                        memcpy(&x1, xres + at + 16, 4);
                        e0[r] = _mm256_add_epi16(e0[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                        e1[r] = _mm256_add_epi16(e1[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                    }
                }
            } else { /* int32 sums */
                const __m256i slo = _mm256_xor_si256(lo, flip), shi = _mm256_xor_si256(hi, flip); /* code - 128 */
                const __m256i alo = _mm256_abs_epi8(slo), ahi = _mm256_abs_epi8(shi); /* as u8: 0..128 */
                for (int r = 0; r < mt; r++) {
                    const int64_t at = r * K + g * GROUP + 4 * i;
                    int32_t x0, x1;
                    memcpy(&x0, xq + at, 4);
                    memcpy(&x1, xq + at + 16, 4);
                    __m256i p0 = _mm256_maddubs_epi16(alo, _mm256_sign_epi8(_mm256_set1_epi32(x0), slo));
                    __m256i p1 = _mm256_maddubs_epi16(ahi, _mm256_sign_epi8(_mm256_set1_epi32(x1), shi));
                    d0[r] = _mm256_add_epi32(d0[r], _mm256_madd_epi16(p0, ones16));
                    d1[r] = _mm256_add_epi32(d1[r], _mm256_madd_epi16(p1, ones16));
                    if (xres) {
                        memcpy(&x0, xres + at, 4);
                        memcpy(&x1, xres + at + 16, 4);
                        p0 = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0));
                        p1 = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1));
                        e0[r] = _mm256_add_epi32(e0[r], _mm256_madd_epi16(p0, ones16));
                        e1[r] = _mm256_add_epi32(e1[r], _mm256_madd_epi16(p1, ones16));
                    }
                }
            }
#endif
        }
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * TILE)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + g * TILE)));
        for (int r = 0; r < mt; r++) {
            const float *dxr = dx + r * 2 * G + 2 * g;
#ifndef HL_DP256
            if (bits == 4) {
                d0[r] = _mm256_madd_epi16(d0[r], ones16);
                d1[r] = _mm256_madd_epi16(d1[r], ones16);
                if (xres) {
                    e0[r] = _mm256_madd_epi16(e0[r], ones16);
                    e1[r] = _mm256_madd_epi16(e1[r], ones16);
                }
            } else {
                const int32_t *xsr = xsq + r * 2 * G + 2 * g;
                d0[r] = _mm256_add_epi32(d0[r], _mm256_set1_epi32(128 * xsr[0]));
                d1[r] = _mm256_add_epi32(d1[r], _mm256_set1_epi32(128 * xsr[1]));
            }
#else
            (void)xsq;
#endif
            if (xres) {
                d0[r] = _mm256_add_epi32(_mm256_slli_epi32(d0[r], 7), e0[r]);
                d1[r] = _mm256_add_epi32(_mm256_slli_epi32(d1[r], 7), e1[r]);
            }
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(d0[r]), _mm256_set1_ps(dxr[0]));
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1[r]), _mm256_set1_ps(dxr[1]), t);
            acc[r] = _mm256_fmadd_ps(t, s, acc[r]);
            acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[r * G + g]), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) {
        float *yr = y + r * ldy;
        _mm256_storeu_ps(yr, accumulate ? _mm256_add_ps(acc[r], _mm256_loadu_ps(yr)) : acc[r]);
    }
}
#else
static void tile_rows(const uint8_t *w, const uint16_t *sc, const uint16_t *mn, int64_t G, int bits,
                      const int8_t *xq, const int8_t *xres, int64_t K, const float *dx, const float *xs, int mt,
                      float *y, int64_t ldy, int accumulate) {
    const int64_t gbytes = TILE * GROUP * bits / 8;
    for (int r = 0; r < mt; r++)
        for (int n = 0; n < TILE; n++) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                int32_t d[2] = {0, 0};
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) {
                        /* bits 4: vectors i and i + 4 share the bytes of packed vector i */
                        const int code = bits == 4 ? (w[g * gbytes + 64 * (j % 4) + 4 * n + t] >> (4 * (j / 4))) & 15
                                                   : w[g * gbytes + 64 * j + 4 * n + t];
                        const int64_t at = r * K + g * GROUP + 4 * j + t;
                        d[j / 4] += code * (xres ? 128 * xq[at] + xres[at] : xq[at]);
                    }
                const float *dxr = dx + r * 2 * G + 2 * g;
                acc += h2f(sc[g * TILE + n]) * (dxr[0] * (float)d[0] + dxr[1] * (float)d[1]) +
                       h2f(mn[g * TILE + n]) * xs[r * G + g];
            }
            y[r * ldy + n] = acc + (accumulate ? y[r * ldy + n] : 0.f);
        }
}
#endif

/* Scratch for the quantized x: grown, never shrunk, one per calling thread. */
static _Thread_local int8_t *scratch;
static _Thread_local size_t scratch_bytes;

/* f(x) rows alone (tests): out [M, K]. */
void hl_prepare_rows(int pre, const float *x, int64_t M, int64_t ldx, int64_t K, const float *norm_w, float eps,
                     float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *v = prepare_row(pre, x + m * ldx, K, norm_w, eps, out + m * K);
        if (v != out + m * K) memcpy(out + m * K, v, sizeof(float) * K);
    }
}

/* y (+)= f(x) @ W^T. x: [M, *] float32 (row stride ldx); f: pre (PRE_*: norm_w [K] and eps for RMSNorm; x rows
 * of 2K for SiLU * mul); W: codes, scale, min in the layout above; y: [M, N] (row stride ldy), added to when
 * accumulate; residual: x's int8 rounding residuals in a second pass (x to within 1/256 of a step, 2x the dot
 * products). K % 32 == 0, N % 16 == 0. Returns 0, or -1 when out of memory. */
int hl_qmatmul(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *codes, const uint16_t *scale,
               const uint16_t *mins, int64_t N, int bits, float *y, int64_t ldy, int pre, const float *norm_w,
               float eps, int accumulate, int residual) {
    const int64_t G = K / GROUP;
    const int64_t xq_bytes = 2 * ((M * K + 63) / 64 * 64 + 64), f_bytes = M * G * 5 * sizeof(float);
    size_t need = (size_t)(xq_bytes + f_bytes + (pre ? M * K * sizeof(float) : 0)) + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = (int8_t *)aligned_alloc(64, (need + 63) / 64 * 64);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    int8_t *xq = scratch, *xres = residual ? scratch + xq_bytes / 2 : NULL;
    float *dx = (float *)(scratch + xq_bytes), *xs = dx + 2 * M * G, *tmp = xs + 3 * M * G;
    int32_t *xsq = (int32_t *)(xs + M * G); /* [M][G][2] */
    const int64_t work = M * N * K;
#pragma omp parallel if (work > (1 << 18)) num_threads(team())
    {
#ifdef _OPENMP
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
        const int nt = 1, tid = 0;
#endif
        for (int64_t m = tid; m < M; m += nt) {
            const float *v = prepare_row(pre, x + m * ldx, K, norm_w, eps, tmp + m * K);
            quantize_row(v, K, xq + m * K, xres ? xres + m * K : NULL, dx + 2 * m * G, xs + m * G, xsq + 2 * m * G);
        }
#pragma omp barrier
        const int64_t tiles = N / TILE, per = (tiles + nt - 1) / nt, t0 = tid * per;
        const int64_t t1 = t0 + per < tiles ? t0 + per : tiles;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *w = codes + t * G * TILE * GROUP * bits / 8;
            const uint16_t *sc = scale + t * G * TILE, *mn = mins + t * G * TILE;
#if HL_AVX2
            /* 16 registers: with the residual pass, 4-bit codes take one row a pass (two spill, measured), 8-bit 2 */
            const int64_t rows = residual ? (bits == 4 ? 1 : 2) : AVX2_ROWS;
            for (int hb = 0; hb < 2; hb++) /* the tile's rows 0-7, then 8-15 */
                for (int64_t m0 = 0; m0 < M; m0 += rows) {
                    const int64_t left = M - m0;
                    const int8_t *xr = xq + m0 * K, *xe = xres ? xres + m0 * K : NULL;
                    const float *dxr = dx + m0 * 2 * G, *xsr = xs + m0 * G;
                    const int32_t *xqs = xsq + m0 * 2 * G;
                    const uint8_t *wh = w + 32 * hb;
                    const uint16_t *sch = sc + 8 * hb, *mnh = mn + 8 * hb;
                    float *yr = y + m0 * ldy + t * TILE + 8 * hb;
#define HL_ROWS8(XE)                                                                                               \
    switch (left < rows ? left : rows) {                                                                           \
        case 1: tile_rows8(wh, sch, mnh, G, bits, xr, XE, K, dxr, xsr, xqs, 1, yr, ldy, accumulate); break;       \
        case 2: tile_rows8(wh, sch, mnh, G, bits, xr, XE, K, dxr, xsr, xqs, 2, yr, ldy, accumulate); break;       \
        case 3: tile_rows8(wh, sch, mnh, G, bits, xr, XE, K, dxr, xsr, xqs, 3, yr, ldy, accumulate); break;       \
        default: tile_rows8(wh, sch, mnh, G, bits, xr, XE, K, dxr, xsr, xqs, AVX2_ROWS, yr, ldy, accumulate); break; \
    }
                    if (xe) { HL_ROWS8(xe) } else { HL_ROWS8(NULL) }
#undef HL_ROWS8
                }
#else
            const int64_t rows = residual ? MAX_ROWS - 2 : MAX_ROWS; /* registers: 4 accumulators a row */
            for (int64_t m0 = 0; m0 < M; m0 += rows) {
                const int64_t left = M - m0;
                const int8_t *xr = xq + m0 * K, *xe = xres ? xres + m0 * K : NULL;
                const float *dxr = dx + m0 * 2 * G, *xsr = xs + m0 * G;
                float *yr = y + m0 * ldy + t * TILE;
#define HL_ROWS(XE)                                                                                                \
    switch (left < rows ? left : rows) {                                                                           \
        case 1: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, 1, yr, ldy, accumulate); break;               \
        case 2: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, 2, yr, ldy, accumulate); break;               \
        case 3: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, 3, yr, ldy, accumulate); break;               \
        case 4: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, 4, yr, ldy, accumulate); break;               \
        case 5: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, 5, yr, ldy, accumulate); break;               \
        default: tile_rows(w, sc, mn, G, bits, xr, XE, K, dxr, xsr, MAX_ROWS, yr, ldy, accumulate); break;       \
    }
                if (xe) { HL_ROWS(xe) } else { HL_ROWS(NULL) } /* NULL: the compiler drops the residual pass */
#undef HL_ROWS
            }
#endif
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Attention over float32 paged pools for any rows (prefill and decode alike), with the rows' RoPE and K/V writes.
 * A row's arithmetic depends on its own q and its own keys only: the same row gives the same bits alone, in a
 * batch, in any prefill chunk or as a decode step. qkv: [T, (H + 2 KVH) D] rows (stride ldq): q heads, k heads,
 * v heads (q, k rotated here: x * cos + roll(x, D/2) * sin, sin's first half negated as Rotary.cos_sin gives it;
 * cos/sin: [T, D]). k/v pools: rows [slot * KVH + h] of D floats; slot_mapping [T]: where each row's k, v go;
 * row t attends the key_count[t] slots key_slots[key_start[t] ..] (its valid keys in position order, its own
 * included; all rows' K/V are written first); out: [T, H D]. softcap <= 0: none. sinks: [H] or NULL: a learned
 * logit per head that joins each row's softmax as one more key with a zero value (gpt-oss). */
/* 8 running sums in a fixed order (not `omp simd reduction`, whose order follows the vector width: the AVX2 and
 * AVX-512 builds would differ) */
static float dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

static void rope(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * cos[i] + x[i < h ? i + h : i - h] * sin[i];
}

/* p[i] = exp(p[i] - max), returns the sum */
static float exp_shifted(float *p, int64_t n, float mx) {
    int64_t i = 0;
    float sum = 0.f;
#if HL_VNNI
    __m512 acc = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(p + i), m));
        _mm512_storeu_ps(p + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) { /* the tail, masked: the padded lanes are e^-inf = 0 */
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, p + i), m));
        _mm512_mask_storeu_ps(p + i, k, e);
        acc = _mm512_add_ps(acc, e);
        i = n;
    }
    sum = hsum16(acc);
#elif HL_AVX2 /* the VNNI path's 16 lanes as two halves */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
    for (; i + 16 <= n; i += 16) {
        __m256 e0 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(p + i), m));
        __m256 e1 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(p + i + 8), m));
        _mm256_storeu_ps(p + i, e0);
        _mm256_storeu_ps(p + i + 8, e1);
        acc0 = _mm256_add_ps(acc0, e0);
        acc1 = _mm256_add_ps(acc1, e1);
    }
    if (i < n) { /* the tail, padded with e^-inf = 0 */
        float t[16];
        for (int j = 0; j < 16; j++) t[j] = i + j < n ? p[i + j] : -INFINITY;
        __m256 e0 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(t), m));
        __m256 e1 = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(t + 8), m));
        _mm256_storeu_ps(t, e0);
        _mm256_storeu_ps(t + 8, e1);
        memcpy(p + i, t, sizeof(float) * (size_t)(n - i));
        acc0 = _mm256_add_ps(acc0, e0);
        acc1 = _mm256_add_ps(acc1, e1);
        i = n;
    }
    sum = hsum8(_mm256_add_ps(acc1, acc0));
#endif
    for (; i < n; i++) { p[i] = expf(p[i] - mx); sum += p[i]; }
    return sum;
}

/* The G query heads q [G, D] (scaled) of kv head kh against one row's L keys: scores into p [G, L], then
 * o [G, D] = softmax(p) V, the softmax over the sink too where sink (the G heads' [G]) is given. Each sum runs in
 * an order fixed by D and L alone. */
static void attend(const float *q, int64_t G, int64_t D, const float *k_pool, const float *v_pool,
                   const int64_t *slots, int64_t L, int64_t KVH, int64_t kh, float softcap, const float *sink,
                   float *p, float *o) {
#if HL_VNNI
    if (D % 16 == 0 && D <= 256 && G <= 8) {
        const int64_t DC = D / 16;
        for (int64_t l = 0; l < L; l++) {
            const float *k = k_pool + (slots[l] * KVH + kh) * D;
            if (l + 2 < L) _mm_prefetch((const char *)(k_pool + (slots[l + 2] * KVH + kh) * D), _MM_HINT_T0);
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + g * D;
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(k)), a1 = _mm512_setzero_ps();
                for (int64_t c = 1; c < DC; c++) {
                    __m512 qc = _mm512_loadu_ps(qg + 16 * c), kc = _mm512_loadu_ps(k + 16 * c);
                    if (c & 1) a1 = _mm512_fmadd_ps(qc, kc, a1); else a0 = _mm512_fmadd_ps(qc, kc, a0);
                }
                p[g * L + l] = hsum16(_mm512_add_ps(a0, a1));
            }
        }
    } else
#elif HL_AVX2
    if (D % 16 == 0 && D <= 256 && G <= 8) { /* the VNNI path's 16 lanes as two halves */
        const int64_t DC = D / 16;
        for (int64_t l = 0; l < L; l++) {
            const float *k = k_pool + (slots[l] * KVH + kh) * D;
            if (l + 2 < L) _mm_prefetch((const char *)(k_pool + (slots[l + 2] * KVH + kh) * D), _MM_HINT_T0);
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + g * D;
                __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(k)), a1 = _mm256_setzero_ps();
                __m256 b0 = _mm256_mul_ps(_mm256_loadu_ps(qg + 8), _mm256_loadu_ps(k + 8)), b1 = _mm256_setzero_ps();
                for (int64_t c = 1; c < DC; c++) {
                    __m256 qa = _mm256_loadu_ps(qg + 16 * c), ka = _mm256_loadu_ps(k + 16 * c);
                    __m256 qb = _mm256_loadu_ps(qg + 16 * c + 8), kb = _mm256_loadu_ps(k + 16 * c + 8);
                    if (c & 1) {
                        a1 = _mm256_fmadd_ps(qa, ka, a1);
                        b1 = _mm256_fmadd_ps(qb, kb, b1);
                    } else {
                        a0 = _mm256_fmadd_ps(qa, ka, a0);
                        b0 = _mm256_fmadd_ps(qb, kb, b0);
                    }
                }
                p[g * L + l] = hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(a0, a1)));
            }
        }
    } else
#endif
    {
        for (int64_t l = 0; l < L; l++)
            for (int64_t g = 0; g < G; g++) p[g * L + l] = dot(q + g * D, k_pool + (slots[l] * KVH + kh) * D, D);
    }
    for (int64_t g = 0; g < G; g++) {
        float *pg = p + g * L, mx = -INFINITY;
        for (int64_t l = 0; l < L; l++) {
            float sc = pg[l];
            if (softcap > 0.f) sc = tanhf(sc / softcap) * softcap;
            pg[l] = sc;
            mx = sc > mx ? sc : mx;
        }
        if (sink && sink[g] > mx) mx = sink[g];
        float inv = 1.f / (exp_shifted(pg, L, mx) + (sink ? expf(sink[g] - mx) : 0.f));
        for (int64_t l = 0; l < L; l++) pg[l] *= inv;
    }
    memset(o, 0, sizeof(float) * G * D);
#if HL_VNNI
    if (D % 16 == 0 && D <= 128 && G <= 4) { /* o in registers: G * D / 16 <= 32 vectors */
        const int64_t DC = D / 16;
        __m512 acc[32];
        for (int64_t i = 0; i < G * DC; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const float *v = v_pool + (slots[l] * KVH + kh) * D;
            if (l + 2 < L) _mm_prefetch((const char *)(v_pool + (slots[l + 2] * KVH + kh) * D), _MM_HINT_T0);
            for (int64_t c = 0; c < DC; c++) {
                __m512 vc = _mm512_loadu_ps(v + 16 * c);
                for (int64_t g = 0; g < G; g++)
                    acc[g * DC + c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * L + l]), vc, acc[g * DC + c]);
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t c = 0; c < DC; c++) _mm512_storeu_ps(o + g * D + 16 * c, acc[g * DC + c]);
        return;
    }
#elif HL_AVX2
    if (D % 8 == 0 && G <= 12) { /* o in registers, a slice of its columns at a time: 12 vectors */
        const int64_t D8 = D / 8, CW = 12 / G;
        for (int64_t c0 = 0; c0 < D8; c0 += CW) {
            const int64_t cn = D8 - c0 < CW ? D8 - c0 : CW;
            __m256 acc[12];
            for (int64_t i = 0; i < G * cn; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t l = 0; l < L; l++) {
                const float *v = v_pool + (slots[l] * KVH + kh) * D + 8 * c0;
                for (int64_t c = 0; c < cn; c++) {
                    __m256 vc = _mm256_loadu_ps(v + 8 * c);
                    for (int64_t g = 0; g < G; g++)
                        acc[g * cn + c] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * L + l]), vc, acc[g * cn + c]);
                }
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < cn; c++) _mm256_storeu_ps(o + g * D + 8 * (c0 + c), acc[g * cn + c]);
        }
        return;
    }
#endif
    for (int64_t l = 0; l < L; l++) {
        const float *v = v_pool + (slots[l] * KVH + kh) * D;
        for (int64_t g = 0; g < G; g++) {
            const float w = p[g * L + l];
            float *og = o + g * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) og[i] += w * v[i];
        }
    }
}

int hl_attention(float *qkv, int64_t ldq, const float *cos, const float *sin, float *k_pool, float *v_pool,
                 const int64_t *slot_mapping, const int64_t *key_slots, const int64_t *key_start,
                 const int64_t *key_count, int64_t T, int64_t H, int64_t KVH, int64_t D, float scale, float softcap,
                 const float *sinks, float *out) {
    const int64_t G = H / KVH;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(T ? T : 1) * H * D);
    if (!buf) return -1;
    int64_t keys = 0;
    for (int64_t t = 0; t < T; t++) keys += key_count[t];
    int failed = 0;
#pragma omp parallel if (keys * H * D > (1 << 14)) num_threads(team())
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) { /* rotate q (into buf, scaled), rotate and store k, store v */
            float *row = qkv + t * ldq;
            const float *c = cos + t * D, *s = sin + t * D;
            const int64_t slot = slot_mapping[t];
            for (int64_t h = 0; h < H; h++) {
                float *qb = buf + (t * H + h) * D;
                rope(row + h * D, c, s, D, qb);
                for (int64_t i = 0; i < D; i++) qb[i] *= scale;
            }
            for (int64_t h = 0; h < KVH; h++) {
                rope(row + (H + h) * D, c, s, D, k_pool + (slot * KVH + h) * D);
                memcpy(v_pool + (slot * KVH + h) * D, row + (H + KVH + h) * D, sizeof(float) * D);
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < T * KVH; u++) {
            const int64_t t = u / KVH, kh = u % KVH, L = key_count[t];
            float stack_p[4096], *p = G * L <= 4096 ? stack_p : (float *)malloc(sizeof(float) * (size_t)G * L);
            if (!p) { failed = 1; continue; }
            attend(buf + (t * H + kh * G) * D, G, D, k_pool, v_pool, key_slots + key_start[t], L, KVH, kh, softcap,
                   sinks ? sinks + kh * G : NULL, p, out + (t * H + kh * G) * D);
            if (p != stack_p) free(p);
        }
    }
    free(buf);
    return failed ? -1 : 0;
}
