/* y = x @ W^T on CPU for group-quantized W (groups of 32 inputs, w = code * scale + min, codes unsigned) with
 * x quantized to int8 on the fly (llama.cpp's Q8 trade, with a scale per 16 inputs: +0.5% perplexity on
 * SmolLM2-135M), u8 x s8 dot products (AVX-512 VNNI vpdpbusd; a portable C loop elsewhere).
 *
 * Layout (kernels/cpu_quant.py packs it): W in tiles of 16 output rows; per tile and group, "vector" j (j = 0..7)
 * holds 64 bytes, 4 codes (inputs 32 g + 4 j .. + 3) of each of the tile's 16 rows: lane n of a 512-bit register.
 * One vpdpbusd against x's 4 inputs broadcast adds 4 products to each row's lane, so a group's 8 vectors leave
 * 16 rows' dot products in one register (two: inputs 0-15 and 16-31 have their own x scale) and the float work is
 * a few ops per group, 16 rows and row of x; no horizontal sums.
 *   bits 8: the 8 vectors stored as is;
 *   bits 4: vectors i and i + 4 share 64 bytes, in the low and high nibbles (i = 0..3).
 * scale, min: fp16 [N / 16][G][16] (a tile's 16 rows side by side). x is quantized per row in natural order with a
 * scale dx = absmax / 127 per 16 inputs and the plain float sum xs per group of 32 (the min term: min * xs).
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
#include <immintrin.h>
#else
#define HL_VNNI 0
#endif

#define GROUP 32
#define TILE 16  /* output rows per tile */
#define MAX_ROWS 6 /* rows of x per pass over a tile */

int hl_simd(void) { return HL_VNNI; }

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
 * rounding residuals in 1/128ths of a step: x = dx * (xq + xr / 128) to within dx / 256, and dx is stored / 128. */
static void quantize_row(const float *x, int64_t K, int8_t *xq, int8_t *xr, float *dx, float *xs) {
    const float dscale = xr ? 1.f / 128 : 1.f;
    for (int64_t g = 0; g < K / GROUP; g++) {
        const float *v = x + g * GROUP;
#if HL_VNNI
        __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
        float amax_a = _mm512_reduce_max_ps(_mm512_abs_ps(a)), amax_b = _mm512_reduce_max_ps(_mm512_abs_ps(b));
        xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
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
    const int64_t xq_bytes = 2 * ((M * K + 63) / 64 * 64 + 64), f_bytes = M * G * 3 * sizeof(float);
    size_t need = (size_t)(xq_bytes + f_bytes + (pre ? M * K * sizeof(float) : 0)) + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = (int8_t *)aligned_alloc(64, (need + 63) / 64 * 64);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    int8_t *xq = scratch, *xres = residual ? scratch + xq_bytes / 2 : NULL;
    float *dx = (float *)(scratch + xq_bytes), *xs = dx + 2 * M * G, *tmp = xs + M * G;
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
            quantize_row(v, K, xq + m * K, xres ? xres + m * K : NULL, dx + 2 * m * G, xs + m * G);
        }
#pragma omp barrier
        const int64_t tiles = N / TILE, per = (tiles + nt - 1) / nt, t0 = tid * per;
        const int64_t t1 = t0 + per < tiles ? t0 + per : tiles;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *w = codes + t * G * TILE * GROUP * bits / 8;
            const uint16_t *sc = scale + t * G * TILE, *mn = mins + t * G * TILE;
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
 * included; all rows' K/V are written first); out: [T, H D]. softcap <= 0: none. */
static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
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
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) { p[i] = expf(p[i] - mx); sum += p[i]; }
    return sum;
}

/* The G query heads q [G, D] (scaled) of kv head kh against one row's L keys: scores into p [G, L], then
 * o [G, D] = softmax(p) V. Each sum runs in an order fixed by D and L alone. */
static void attend(const float *q, int64_t G, int64_t D, const float *k_pool, const float *v_pool,
                   const int64_t *slots, int64_t L, int64_t KVH, int64_t kh, float softcap, float *p, float *o) {
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
                    __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(qg + 16 * c), _mm512_loadu_ps(k + 16 * c));
                    if (c & 1) a1 = _mm512_add_ps(a1, prod); else a0 = _mm512_add_ps(a0, prod);
                }
                p[g * L + l] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
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
        float inv = 1.f / exp_shifted(pg, L, mx);
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
                 float *out) {
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
                   p, out + (t * H + kh * G) * D);
            if (p != stack_p) free(p);
        }
    }
    free(buf);
    return failed ? -1 : 0;
}
