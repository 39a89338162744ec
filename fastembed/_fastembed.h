/* Small portability shims for _kernels.pyx: OpenMP queries, bit tricks, prefetch, and the row loops. */
#ifndef FASTEMBED_H
#define FASTEMBED_H
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
static inline int fe_omp_max_threads(void) { return omp_get_max_threads(); }
static inline int fe_omp_num_procs(void) { return omp_get_num_procs(); }
/* The size of the team running the calling code (1 outside a parallel region). */
static inline int fe_omp_team_size(void) { return omp_get_num_threads(); }
static inline int fe_openmp_enabled(void) { return 1; }
#else
static inline int fe_omp_max_threads(void) { return 1; }
static inline int fe_omp_num_procs(void) { return 1; }
static inline int fe_omp_team_size(void) { return 1; }
static inline int fe_openmp_enabled(void) { return 0; }
#endif

#if defined(_MSC_VER)
#include <intrin.h>
static inline int fe_ctz64(uint64_t x) { unsigned long i; _BitScanForward64(&i, x); return (int)i; }
static inline int fe_popcount64(uint64_t x) { return (int)__popcnt64(x); }
#else
static inline int fe_ctz64(uint64_t x) { return __builtin_ctzll(x); }
static inline int fe_popcount64(uint64_t x) { return __builtin_popcountll(x); }
#endif

#define FE_RESTRICT __restrict

/* Baseline builds target plain x86-64 (SSE2); GCC's function clones add an AVX2 body picked at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FE_CLONES
#endif

/* out[d] = a[d] + b[d]: an AVX2 clone where the CPU has it, chosen once at load time. */
FE_CLONES static void fe_add_rows(float *FE_RESTRICT out, const float *FE_RESTRICT a, const float *FE_RESTRICT b, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] = a[d] + b[d];
}

/* g[d] += s[d], the inner loop of every scatter-add. */
FE_CLONES static void fe_add_into(float *FE_RESTRICT g, const float *FE_RESTRICT s, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) g[d] += s[d];
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FE_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FE_FMA_CLONES
#endif

/* The optimizer row updates, written once for a table element type T (float or double), computing in T.
   float32 tables use the `float` instances (fe_adam_row, ...), float64 tables the `_f64` ones; the 16-bit
   tables are widened to float32, updated by the float instances and rounded back once per stored element
   (_optim.pxi). Without -ffast-math (and with -ffp-contract=off) the compiler keeps each expression's
   order and rounding, so a transcription of a formula in T gives the same bits.
   - adam_row: m, v move towards g; w moves by the bias-corrected ratio. Corrections arrive as reciprocals,
     leaving one division and one sqrt per element.
   - sgd_row: w[d] = w[d] - lr * g[d] (the product rounded first, as numpy's `w -= lr * g` rounds it).
   - sgd_row_fma: torch's rounding, w[d] = fma(-lr, g[d], w[d]), one rounding (what torch's
     `param.add_(grad, alpha=-lr)` gives on CPU). FE_FMA_CLONES: an "fma" clone (FMA3 and AVX) does it in
     hardware and is picked on every CPU with FMA; the default clone calls libm's fma, exact too, about 3x
     slower. Not "arch=haswell" (the resolver asks for that CPU model, so a newer CPU got the default) nor
     an "avx2" clone beside it (the resolver prefers avx2, which has no FMA).
   - adagrad_row: torch's order for a dense gradient: the sum of squares grows by g^2, then w moves by
     (clr * g) / (sqrt(sum) + eps).
   - sum_squares: the sum of g[d]^2 in column order, a fixed order (a transcription gives the same bits).
   - rowwise_row: row-wise Adagrad, one accumulator *s per row: *s += sum_squares(g) / n, then
     scaled_row: w[d] -= (lr * g[d]) / (sqrt(*s) + eps). A row of no columns has no mean square: nothing
     moves. (rowwise_row is inline and scaled_row a clone, so the sum of squares runs in the caller: one
     clone per row made rowwise_adagrad_step 20% slower.) */
#define FE_DEFINE_OPTIM_ROWS(SUF, T, SQRT, FMA)                                                                \
    FE_CLONES static void fe_adam_row##SUF(T *FE_RESTRICT w, T *FE_RESTRICT m, T *FE_RESTRICT v,              \
                                           const T *FE_RESTRICT g, ptrdiff_t n, T lr, T beta1, T beta2, T eps, \
                                           T inv_bias1, T inv_bias2) {                                        \
        const T keep1 = (T)1 - beta1, keep2 = (T)1 - beta2;                                                    \
        for (ptrdiff_t d = 0; d < n; d++) {                                                                    \
            T gd = g[d];                                                                                       \
            T md = beta1 * m[d] + keep1 * gd;                                                                  \
            T vd = beta2 * v[d] + keep2 * (gd * gd);                                                           \
            m[d] = md;                                                                                         \
            v[d] = vd;                                                                                         \
            w[d] -= lr * (md * inv_bias1) / (SQRT(vd * inv_bias2) + eps);                                      \
        }                                                                                                      \
    }                                                                                                          \
    FE_CLONES static void fe_sgd_row##SUF(T *FE_RESTRICT w, const T *FE_RESTRICT g, ptrdiff_t n, T lr) {      \
        for (ptrdiff_t d = 0; d < n; d++) w[d] -= lr * g[d];                                                   \
    }                                                                                                          \
    FE_FMA_CLONES static void fe_sgd_row_fma##SUF(T *FE_RESTRICT w, const T *FE_RESTRICT g, ptrdiff_t n,      \
                                                  T lr) {                                                      \
        const T neg = -lr;                                                                                     \
        for (ptrdiff_t d = 0; d < n; d++) w[d] = FMA(neg, g[d], w[d]);                                         \
    }                                                                                                          \
    FE_CLONES static void fe_adagrad_row##SUF(T *FE_RESTRICT w, T *FE_RESTRICT s, const T *FE_RESTRICT g,     \
                                              ptrdiff_t n, T clr, T eps) {                                     \
        for (ptrdiff_t d = 0; d < n; d++) {                                                                    \
            T gd = g[d];                                                                                       \
            T sd = s[d] + gd * gd;                                                                             \
            s[d] = sd;                                                                                         \
            w[d] -= clr * gd / (SQRT(sd) + eps);                                                               \
        }                                                                                                      \
    }                                                                                                          \
    static inline T fe_sum_squares##SUF(const T *g, ptrdiff_t n) {                                             \
        T acc = (T)0;                                                                                          \
        for (ptrdiff_t d = 0; d < n; d++) acc += g[d] * g[d];                                                  \
        return acc;                                                                                            \
    }                                                                                                          \
    FE_CLONES static void fe_scaled_row##SUF(T *FE_RESTRICT w, const T *FE_RESTRICT g, ptrdiff_t n, T lr,      \
                                             T std) {                                                          \
        for (ptrdiff_t d = 0; d < n; d++) w[d] -= lr * g[d] / std;                                             \
    }                                                                                                          \
    static inline void fe_rowwise_row##SUF(T *FE_RESTRICT w, T *FE_RESTRICT s, const T *FE_RESTRICT g,        \
                                           ptrdiff_t n, T lr, T eps) {                                         \
        if (n == 0) return;                                                                                    \
        const T G = *s + fe_sum_squares##SUF(g, n) / (T)n;                                                     \
        *s = G;                                                                                                \
        fe_scaled_row##SUF(w, g, n, lr, SQRT(G) + eps);                                                        \
    }

FE_DEFINE_OPTIM_ROWS(, float, sqrtf, fmaf)
FE_DEFINE_OPTIM_ROWS(_f64, double, sqrt, fma)

/* ---- Table element types other than float32 (the lookup, scatter and optimizer kernels).
   The two 16-bit formats are distinct structs so that a Cython fused type can tell them apart; they are
   stored as 16 bits and every sum is formed in float32 (torch's rule on CPU), rounded to nearest even once
   per stored result. */
typedef struct { uint16_t bits; } fe_f16;   /* IEEE 754 binary16 (numpy float16) */
typedef struct { uint16_t bits; } fe_bf16;  /* bfloat16: the top half of a float32 (ml_dtypes.bfloat16) */

static inline uint32_t fe_float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fe_bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* bfloat16 <-> float: widening is exact (a shift); narrowing rounds to nearest even and turns every NaN into
   the quiet NaN 0x7fc0, as torch's c10::BFloat16 does. Branch-free, so the row loops below vectorise. */
static inline float fe_bf16_to_float(uint16_t h) { return fe_bits_float((uint32_t)h << 16); }
static inline uint16_t fe_float_to_bf16(float f) {
    uint32_t u = fe_float_bits(f);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
}

/* binary16 <-> float in portable integer code: the fallback where the CPU has no F16C (and the model the
   tests hold F16C to). Narrowing rounds to nearest even, keeps subnormals, overflows to inf at 65520,
   and keeps a NaN a NaN (quiet, its top payload bits kept). */
static inline float fe_f16_to_float_sw(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return fe_bits_float(sign | 0x7f800000u | (m << 13));
    if (e != 0) return fe_bits_float(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return fe_bits_float(sign);
    e = 113;  /* a subnormal: shift its leading one up to the implicit bit */
    while (!(m & 0x400u)) { m <<= 1; e--; }
    return fe_bits_float(sign | (e << 23) | ((m & 0x3ffu) << 13));
}
static inline uint16_t fe_float_to_f16_sw(float f) {
    uint32_t u = fe_float_bits(f), a = u & 0x7fffffffu;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* >= 65520 (and inf): inf */
    if (a >= 0x38800000u) {  /* a normal half: rebias the exponent, round at bit 13 */
        uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return sign;  /* below 2^-25, half the smallest subnormal: rounds to zero */
    {   /* a subnormal half: the value in units of 2^-24, rounded to nearest even */
        uint32_t mant = (a & 0x7fffffu) | 0x800000u, s = 126u - (a >> 23);
        uint32_t q = mant >> s, rem = mant & ((1u << s) - 1u), half = 1u << (s - 1u);
        q += (rem > half || (rem == half && (q & 1u)));
        return (uint16_t)(sign | q);
    }
}

/* F16C (x86: vcvtph2ps / vcvtps2ph, eight lanes) where the CPU has it, picked at run time; the compiler
   flags for it apply inside these functions only, so the module still loads on any x86-64. GCC 12 does
   not vectorise _Float16 conversions in a target_clones clone, hence intrinsics. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FE_HAVE_F16C 1
/* Runs the statements after n over a row of n columns eight lanes at a time, d the first column and left the
   lanes to take: the constant 8 in the main loop (the loads and stores below inline to full vectors, with no
   length test per vector), then n - d once for the tail. */
#define FE_EACH_8_LANES(n, ...)                                                                               \
    {                                                                                                         \
        ptrdiff_t d = 0;                                                                                      \
        for (; d + 8 <= (n); d += 8) { const ptrdiff_t left = 8; __VA_ARGS__ }                                \
        if (d < (n)) { const ptrdiff_t left = (n) - d; __VA_ARGS__ }                                          \
    }
#define FE_F16C_FN __attribute__((target("avx,f16c")))
FE_F16C_FN static inline __m256 fe_f16c_load(const uint16_t *p, ptrdiff_t n) {
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)n * 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}
FE_F16C_FN static inline void fe_f16c_store(uint16_t *p, __m256 x, ptrdiff_t n) {
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (n >= 8) { _mm_storeu_si128((__m128i *)p, h); return; }
    uint16_t tmp[8];
    _mm_storeu_si128((__m128i *)tmp, h);
    memcpy(p, tmp, (size_t)n * 2);
}
FE_F16C_FN static void fe_f16c_add_rows(uint16_t *FE_RESTRICT out, const uint16_t *FE_RESTRICT a,
                                        const uint16_t *FE_RESTRICT b, ptrdiff_t n) {
    FE_EACH_8_LANES(n, fe_f16c_store(out + d, _mm256_add_ps(fe_f16c_load(a + d, left), fe_f16c_load(b + d, left)), left);)
}
FE_F16C_FN static void fe_f16c_add_into(uint16_t *FE_RESTRICT g, const uint16_t *FE_RESTRICT s, ptrdiff_t n) {
    FE_EACH_8_LANES(n, fe_f16c_store(g + d, _mm256_add_ps(fe_f16c_load(g + d, left), fe_f16c_load(s + d, left)), left);)
}
/* w += a * g with a already a float16 value: the product is exact in float32, the sum rounded to float32 and
   then to float16, as the portable loop of fe_scaled_add_f16 rounds it. */
FE_F16C_FN static void fe_f16c_scaled_add(uint16_t *FE_RESTRICT w, const uint16_t *FE_RESTRICT g, ptrdiff_t n,
                                          float a) {
    const __m256 av = _mm256_set1_ps(a);
    FE_EACH_8_LANES(n, fe_f16c_store(w + d, _mm256_add_ps(fe_f16c_load(w + d, left),
                                                          _mm256_mul_ps(av, fe_f16c_load(g + d, left))), left);)
}
FE_F16C_FN static void fe_f16c_widen(float *FE_RESTRICT out, const uint16_t *FE_RESTRICT h, ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(out + d, fe_f16c_load(h + d, 8));
    if (d < n) {
        float tmp[8];
        _mm256_storeu_ps(tmp, fe_f16c_load(h + d, n - d));
        memcpy(out + d, tmp, (size_t)(n - d) * 4);
    }
}
FE_F16C_FN static void fe_f16c_narrow(uint16_t *FE_RESTRICT h, const float *FE_RESTRICT f, ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8) fe_f16c_store(h + d, _mm256_loadu_ps(f + d), 8);
    if (d < n) {
        float tmp[8] = {0};
        memcpy(tmp, f + d, (size_t)(n - d) * 4);
        fe_f16c_store(h + d, _mm256_loadu_ps(tmp), n - d);
    }
}
#define FE_AVX2_FN __attribute__((target("avx2")))
FE_AVX2_FN static inline __m256 fe_avx2_bf16_load(const uint16_t *p, ptrdiff_t n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128((const __m128i *)p);
    } else {
        uint16_t lanes[8] = {0};
        memcpy(lanes, p, (size_t)n * 2);
        h = _mm_loadu_si128((const __m128i *)lanes);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/* fe_float_to_bf16 on eight lanes: (u + 0x7fff + lsb) >> 16, a NaN as 0x7fc0; packed to 16 bits in order. */
FE_AVX2_FN static inline void fe_avx2_bf16_store(uint16_t *p, __m256 x, ptrdiff_t n) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (n >= 8) { _mm_storeu_si128((__m128i *)p, h); return; }
    uint16_t lanes[8];
    _mm_storeu_si128((__m128i *)lanes, h);
    memcpy(p, lanes, (size_t)n * 2);
}
/* vcvtneps2bf16 (AVX512_BF16) rounds to nearest even as fe_float_to_bf16 does, in one instruction, but reads a
   subnormal float32 as zero and keeps a NaN's sign and payload: a vector holding either goes to the integer
   lanes above instead (fpclass: quiet NaN 0x01, subnormal 0x20, signalling NaN 0x80). */
#define FE_AVX512BF16_FN __attribute__((target("avx512f,avx512vl,avx512dq,avx512bf16")))
FE_AVX512BF16_FN static inline void fe_avx512_bf16_store(uint16_t *p, __m256 x, ptrdiff_t n) {
    if (_mm256_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) {
        fe_avx2_bf16_store(p, x, n);
        return;
    }
    const __m128i h = (__m128i)_mm256_cvtneps_pbh(x);
    if (n >= 8) { _mm_storeu_si128((__m128i *)p, h); return; }
    uint16_t rounded[8];
    _mm_storeu_si128((__m128i *)rounded, h);
    memcpy(p, rounded, (size_t)n * 2);
}
/* bfloat16 rows on eight lanes (the portable loops' bits: widening exact, one float32 op, fe_float_to_bf16's
   rounding): the lookups' adds and the 16-bit SGD row, for AVX2 and for AVX512_BF16 (STORE). */
#define FE_BF16_ROW_OPS(PREFIX, ATTR, STORE)                                                                  \
    ATTR static void PREFIX##_add_rows(uint16_t *FE_RESTRICT out, const uint16_t *FE_RESTRICT a,              \
                                       const uint16_t *FE_RESTRICT b, ptrdiff_t n) {                         \
        FE_EACH_8_LANES(n, STORE(out + d, _mm256_add_ps(fe_avx2_bf16_load(a + d, left),                     \
                                                        fe_avx2_bf16_load(b + d, left)), left);)               \
    }                                                                                                          \
    ATTR static void PREFIX##_add_into(uint16_t *FE_RESTRICT g, const uint16_t *FE_RESTRICT s, ptrdiff_t n) {  \
        FE_EACH_8_LANES(n, STORE(g + d, _mm256_add_ps(fe_avx2_bf16_load(g + d, left),                       \
                                                      fe_avx2_bf16_load(s + d, left)), left);)                 \
    }                                                                                                          \
    ATTR static void PREFIX##_scaled_add(uint16_t *FE_RESTRICT w, const uint16_t *FE_RESTRICT g, ptrdiff_t n,  \
                                         float a) {                                                            \
        const __m256 av = _mm256_set1_ps(a);                                                                   \
        FE_EACH_8_LANES(n, STORE(w + d, _mm256_add_ps(fe_avx2_bf16_load(w + d, left),                       \
                                                      _mm256_mul_ps(av, fe_avx2_bf16_load(g + d, left))), left);) \
    }
FE_BF16_ROW_OPS(fe_avx2_bf16, FE_AVX2_FN, fe_avx2_bf16_store)
FE_BF16_ROW_OPS(fe_avx512_bf16, FE_AVX512BF16_FN, fe_avx512_bf16_store)
/* The AVX512_BF16 rows take sixteen lanes (one zmm) at a time, then the eight-lane ops above on the tail: the
   conversions are about half of a row add's instructions, and an add of two cached rows is bound by them. */
FE_AVX512BF16_FN static inline __m512 fe_avx512_bf16_load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* fe_avx512_bf16_store on sixteen lanes: the same fix-up (NaN or subnormal: each half to the integer rounding). */
FE_AVX512BF16_FN static inline void fe_avx512_bf16_store16(uint16_t *p, __m512 x) {
    if (_mm512_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) {
        fe_avx2_bf16_store(p, _mm512_castps512_ps256(x), 8);
        fe_avx2_bf16_store(p + 8, _mm512_extractf32x8_ps(x, 1), 8);
        return;
    }
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}
FE_AVX512BF16_FN static void fe_avx512_bf16_add_rows16(uint16_t *FE_RESTRICT out, const uint16_t *FE_RESTRICT a,
                                                      const uint16_t *FE_RESTRICT b, ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 16 <= n; d += 16)
        fe_avx512_bf16_store16(out + d, _mm512_add_ps(fe_avx512_bf16_load16(a + d), fe_avx512_bf16_load16(b + d)));
    if (d < n) fe_avx512_bf16_add_rows(out + d, a + d, b + d, n - d);
}
FE_AVX512BF16_FN static void fe_avx512_bf16_add_into16(uint16_t *FE_RESTRICT g, const uint16_t *FE_RESTRICT s,
                                                      ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 16 <= n; d += 16)
        fe_avx512_bf16_store16(g + d, _mm512_add_ps(fe_avx512_bf16_load16(g + d), fe_avx512_bf16_load16(s + d)));
    if (d < n) fe_avx512_bf16_add_into(g + d, s + d, n - d);
}
FE_AVX512BF16_FN static void fe_avx512_bf16_scaled_add16(uint16_t *FE_RESTRICT w, const uint16_t *FE_RESTRICT g,
                                                        ptrdiff_t n, float a) {
    const __m512 av = _mm512_set1_ps(a);
    ptrdiff_t d = 0;
    for (; d + 16 <= n; d += 16)
        fe_avx512_bf16_store16(w + d, _mm512_add_ps(fe_avx512_bf16_load16(w + d),
                                                    _mm512_mul_ps(av, fe_avx512_bf16_load16(g + d))));
    if (d < n) fe_avx512_bf16_scaled_add(w + d, g + d, n - d, a);
}
/* 1: F16C; 0: the portable code. Set once at import (fe_f16_init) and by a private test hook. fe_use_avx2:
   the same for the bfloat16 rows written with AVX2 intrinsics (the switch turns both on or off). */
static int fe_use_f16c = 0;
static int fe_use_avx2 = 0;
static int fe_use_avx512bf16 = 0;
#include <cpuid.h>
/* CPUID leaf 1: F16C (ECX bit 29), AVX (28) and OSXSAVE (27), and the OS saving the YMM registers
   (XCR0 bits 1-2); GCC and clang alike (clang's __builtin_cpu_supports may not know "f16c"). */
static inline int fe_cpu_has_f16c(void) {
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 29)) || !(c & (1u << 28)) || !(c & (1u << 27))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6u) == 6u;
}
static inline int fe_cpu_has_avx2(void) { return fe_cpu_has_f16c() && __builtin_cpu_supports("avx2"); }
/* AVX512_BF16 with VL and DQ (fpclass), and the OS saving the opmask and ZMM state (XCR0 bits 5-7). */
static inline int fe_cpu_has_avx512bf16(void) {
    unsigned lo, hi;
    if (!fe_cpu_has_avx2() || !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vl")
        || !__builtin_cpu_supports("avx512dq"))
        return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6u) == 0xe6u;
}
#else
#define FE_HAVE_F16C 0
static int fe_use_f16c = 0;
static int fe_use_avx2 = 0;
static int fe_use_avx512bf16 = 0;
static inline int fe_cpu_has_f16c(void) { return 0; }
static inline int fe_cpu_has_avx2(void) { return 0; }
static inline int fe_cpu_has_avx512bf16(void) { return 0; }
#endif

static inline int fe_f16_init(void) {
    fe_use_f16c = fe_cpu_has_f16c();
    fe_use_avx2 = fe_cpu_has_avx2();
    fe_use_avx512bf16 = fe_cpu_has_avx512bf16();
    return fe_use_f16c;
}
/* For the tests: 0 forces the portable code (float16 conversions and the bfloat16 AVX2 rows); 1 asks for
   the hardware paths (each granted only where the CPU has it). */
static inline int fe_f16_set_hardware(int on) {
    fe_use_f16c = on && fe_cpu_has_f16c();
    fe_use_avx2 = on && fe_cpu_has_avx2();
    fe_use_avx512bf16 = on && fe_cpu_has_avx512bf16();
    return fe_use_f16c;
}
static inline int fe_f16_hardware(void) { return fe_use_f16c; }
/* The bfloat16 lanes in use: 0 the portable loops, 1 AVX2, 2 AVX512_BF16. For the tests, fe_bf16_set_lanes asks
   for a level (granted up to what the CPU has) and returns the one in use. */
static inline int fe_bf16_hardware(void) { return fe_use_avx512bf16 ? 2 : fe_use_avx2 ? 1 : 0; }
static inline int fe_bf16_set_lanes(int level) {
    fe_use_avx2 = level >= 1 && fe_cpu_has_avx2();
    fe_use_avx512bf16 = level >= 2 && fe_cpu_has_avx512bf16();
    return fe_bf16_hardware();
}

/* The row operations of the kernels for each element type: out = a + b, and g += s (a scatter's add).
   float64: in float64. 16-bit: widened to float32, added, rounded once per stored element; a scatter-add
   thus rounds after each add, as torch's embedding_dense_backward does for half tables on CPU. */
FE_CLONES static void fe_add_rows_f64(double *FE_RESTRICT out, const double *FE_RESTRICT a,
                                      const double *FE_RESTRICT b, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] = a[d] + b[d];
}
FE_CLONES static void fe_add_into_f64(double *FE_RESTRICT g, const double *FE_RESTRICT s, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) g[d] += s[d];
}
/* g[d] = 0 + s[d]: a sum's first term (a bag's first row, coalesce's first row of a distinct id), written
   where it used to be added to zeros: the same bits as 0 + s (-0.0 becomes +0.0, as the +0.0 a sum starts
   from makes it; NaN and inf stay), without the pass that zeroed g and read it back. */
FE_CLONES static void fe_first_into(float *FE_RESTRICT g, const float *FE_RESTRICT s, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) g[d] = 0.0f + s[d];
}
FE_CLONES static void fe_first_into_f64(double *FE_RESTRICT g, const double *FE_RESTRICT s, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) g[d] = 0.0 + s[d];
}
FE_CLONES static void fe_add_rows_bf16_sw(fe_bf16 *FE_RESTRICT out, const fe_bf16 *FE_RESTRICT a,
                                          const fe_bf16 *FE_RESTRICT b, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++)
        out[d].bits = fe_float_to_bf16(fe_bf16_to_float(a[d].bits) + fe_bf16_to_float(b[d].bits));
}
FE_CLONES static void fe_add_into_bf16_sw(fe_bf16 *FE_RESTRICT g, const fe_bf16 *FE_RESTRICT s, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++)
        g[d].bits = fe_float_to_bf16(fe_bf16_to_float(g[d].bits) + fe_bf16_to_float(s[d].bits));
}
static void fe_add_rows_bf16(fe_bf16 *FE_RESTRICT out, const fe_bf16 *FE_RESTRICT a, const fe_bf16 *FE_RESTRICT b,
                             ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_avx512bf16) {
        fe_avx512_bf16_add_rows16((uint16_t *)out, (const uint16_t *)a, (const uint16_t *)b, n);
        return;
    }
    if (fe_use_avx2) { fe_avx2_bf16_add_rows((uint16_t *)out, (const uint16_t *)a, (const uint16_t *)b, n); return; }
#endif
    fe_add_rows_bf16_sw(out, a, b, n);
}
static void fe_add_into_bf16(fe_bf16 *FE_RESTRICT g, const fe_bf16 *FE_RESTRICT s, ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_avx512bf16) { fe_avx512_bf16_add_into16((uint16_t *)g, (const uint16_t *)s, n); return; }
    if (fe_use_avx2) { fe_avx2_bf16_add_into((uint16_t *)g, (const uint16_t *)s, n); return; }
#endif
    fe_add_into_bf16_sw(g, s, n);
}
FE_CLONES static void fe_widen_bf16(float *FE_RESTRICT out, const fe_bf16 *FE_RESTRICT h, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] = fe_bf16_to_float(h[d].bits);
}
FE_CLONES static void fe_narrow_bf16(fe_bf16 *FE_RESTRICT h, const float *FE_RESTRICT f, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) h[d].bits = fe_float_to_bf16(f[d]);
}
static void fe_add_rows_f16(fe_f16 *FE_RESTRICT out, const fe_f16 *FE_RESTRICT a, const fe_f16 *FE_RESTRICT b,
                            ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_add_rows((uint16_t *)out, (const uint16_t *)a, (const uint16_t *)b, n); return; }
#endif
    for (ptrdiff_t d = 0; d < n; d++)
        out[d].bits = fe_float_to_f16_sw(fe_f16_to_float_sw(a[d].bits) + fe_f16_to_float_sw(b[d].bits));
}
static void fe_add_into_f16(fe_f16 *FE_RESTRICT g, const fe_f16 *FE_RESTRICT s, ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_add_into((uint16_t *)g, (const uint16_t *)s, n); return; }
#endif
    for (ptrdiff_t d = 0; d < n; d++)
        g[d].bits = fe_float_to_f16_sw(fe_f16_to_float_sw(g[d].bits) + fe_f16_to_float_sw(s[d].bits));
}
static void fe_widen_f16(float *FE_RESTRICT out, const fe_f16 *FE_RESTRICT h, ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_widen(out, (const uint16_t *)h, n); return; }
#endif
    for (ptrdiff_t d = 0; d < n; d++) out[d] = fe_f16_to_float_sw(h[d].bits);
}
static void fe_narrow_f16(fe_f16 *FE_RESTRICT h, const float *FE_RESTRICT f, ptrdiff_t n) {
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_narrow((uint16_t *)h, f, n); return; }
#endif
    for (ptrdiff_t d = 0; d < n; d++) h[d].bits = fe_float_to_f16_sw(f[d]);
}

/* w[d] += a * g[d] as torch's `row.add_(g, alpha=a)` gives it on CPU, for scale_grad_by_freq's scaled
   scatter (embedding_dense_backward adds each lookup's row scaled by 1 / the count of its id): one rounding
   (fma) for float32 and float64. For the 16-bit types, as torch's vectorised loop: a rounded to the type,
   then w + a * g in float (the product is exact there: two 8- or 11-bit significands) rounded once to the
   type. (torch's scalar loop, which torch 2.13 runs on the last D % 32 columns on an AVX2 or AVX-512 CPU,
   rounds the product to the type first: up to one unit in the last place apart there.) */
FE_FMA_CLONES static void fe_scaled_add_f32(float *FE_RESTRICT w, const float *FE_RESTRICT g, ptrdiff_t n,
                                            float a) {
    for (ptrdiff_t d = 0; d < n; d++) w[d] = fmaf(a, g[d], w[d]);
}
FE_FMA_CLONES static void fe_scaled_add_f64(double *FE_RESTRICT w, const double *FE_RESTRICT g, ptrdiff_t n,
                                            double a) {
    for (ptrdiff_t d = 0; d < n; d++) w[d] = fma(a, g[d], w[d]);
}
FE_CLONES static void fe_scaled_add_bf16_sw(fe_bf16 *FE_RESTRICT w, const fe_bf16 *FE_RESTRICT g, ptrdiff_t n,
                                            float a16) {
    for (ptrdiff_t d = 0; d < n; d++)
        w[d].bits = fe_float_to_bf16(fe_bf16_to_float(w[d].bits) + a16 * fe_bf16_to_float(g[d].bits));
}
static void fe_scaled_add_bf16(fe_bf16 *FE_RESTRICT w, const fe_bf16 *FE_RESTRICT g, ptrdiff_t n, float a) {
    const float a16 = fe_bf16_to_float(fe_float_to_bf16(a));
#if FE_HAVE_F16C
    if (fe_use_avx512bf16) { fe_avx512_bf16_scaled_add16((uint16_t *)w, (const uint16_t *)g, n, a16); return; }
    if (fe_use_avx2) { fe_avx2_bf16_scaled_add((uint16_t *)w, (const uint16_t *)g, n, a16); return; }
#endif
    fe_scaled_add_bf16_sw(w, g, n, a16);
}
static void fe_scaled_add_f16(fe_f16 *FE_RESTRICT w, const fe_f16 *FE_RESTRICT g, ptrdiff_t n, float a) {
    /* the portable conversions: F16C's give the same bits (tests/test_dtypes.py holds them to it) */
    const float a16 = fe_f16_to_float_sw(fe_float_to_f16_sw(a));
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_scaled_add((uint16_t *)w, (const uint16_t *)g, n, a16); return; }
#endif
    for (ptrdiff_t d = 0; d < n; d++)
        w[d].bits = fe_float_to_f16_sw(fe_f16_to_float_sw(w[d].bits) + a16 * fe_f16_to_float_sw(g[d].bits));
}

/* Adam and Adagrad rows of a 16-bit table in registers: each element widened, updated by the expressions of
   fe_adam_row / fe_adagrad_row in float32 (same operations, same order: the bits of widening the row into
   float32 scratch, running the float32 row and rounding back), and rounded once per stored element (w, and
   m and v, or the sum). One pass over the row and its state instead of widen, update and narrow passes. */
#define FE_ADAM_ELEMS16(TO_F, FROM_F)                                                                         \
    const float keep1 = 1.0f - beta1, keep2 = 1.0f - beta2;                                                   \
    for (ptrdiff_t d = 0; d < n; d++) {                                                                        \
        const float gd = TO_F(g[d].bits);                                                                      \
        const float md = beta1 * TO_F(m[d].bits) + keep1 * gd;                                                 \
        const float vd = beta2 * TO_F(v[d].bits) + keep2 * (gd * gd);                                          \
        m[d].bits = FROM_F(md);                                                                                \
        v[d].bits = FROM_F(vd);                                                                                \
        w[d].bits = FROM_F(TO_F(w[d].bits) - lr * (md * inv_bias1) / (sqrtf(vd * inv_bias2) + eps));          \
    }
#define FE_ADAGRAD_ELEMS16(TO_F, FROM_F)                                                                      \
    for (ptrdiff_t d = 0; d < n; d++) {                                                                        \
        const float gd = TO_F(g[d].bits);                                                                      \
        const float sd = TO_F(s[d].bits) + gd * gd;                                                            \
        s[d].bits = FROM_F(sd);                                                                                \
        w[d].bits = FROM_F(TO_F(w[d].bits) - clr * gd / (sqrtf(sd) + eps));                                   \
    }
FE_CLONES static void fe_adam_row_bf16_sw(fe_bf16 *FE_RESTRICT w, fe_bf16 *FE_RESTRICT m, fe_bf16 *FE_RESTRICT v,
                                          const fe_bf16 *FE_RESTRICT g, ptrdiff_t n, float lr, float beta1,
                                          float beta2, float eps, float inv_bias1, float inv_bias2) {
    FE_ADAM_ELEMS16(fe_bf16_to_float, fe_float_to_bf16)
}
FE_CLONES static void fe_adagrad_row_bf16_sw(fe_bf16 *FE_RESTRICT w, fe_bf16 *FE_RESTRICT s,
                                             const fe_bf16 *FE_RESTRICT g, ptrdiff_t n, float clr, float eps) {
    FE_ADAGRAD_ELEMS16(fe_bf16_to_float, fe_float_to_bf16)
}
#if FE_HAVE_F16C
/* The same two rows eight lanes at a time with hand-written conversions (GCC 12 vectorises neither the F16C
   conversions nor the bfloat16 ones well): float16 with F16C, bfloat16 with AVX2 integer ops (the rounding of
   fe_float_to_bf16, lane by lane). A row's tail: lanes past n read as 0 and are never stored. */
#define FE_ADAM_LANES(LOAD, STORE)                                                                            \
    const __m256 b1 = _mm256_set1_ps(beta1), b2 = _mm256_set1_ps(beta2), k1 = _mm256_set1_ps(1.0f - beta1),   \
                 k2 = _mm256_set1_ps(1.0f - beta2), rate = _mm256_set1_ps(lr), e = _mm256_set1_ps(eps),       \
                 c1 = _mm256_set1_ps(inv_bias1), c2 = _mm256_set1_ps(inv_bias2);                              \
    FE_EACH_8_LANES(n,                                                                                         \
        const __m256 gd = LOAD(g + d, left);                                                                   \
        const __m256 md = _mm256_add_ps(_mm256_mul_ps(b1, LOAD(m + d, left)), _mm256_mul_ps(k1, gd));          \
        const __m256 vd = _mm256_add_ps(_mm256_mul_ps(b2, LOAD(v + d, left)),                                  \
                                        _mm256_mul_ps(k2, _mm256_mul_ps(gd, gd)));                             \
        const __m256 step = _mm256_div_ps(_mm256_mul_ps(rate, _mm256_mul_ps(md, c1)),                          \
                                          _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vd, c2)), e));            \
        STORE(m + d, md, left);                                                                                \
        STORE(v + d, vd, left);                                                                                \
        STORE(w + d, _mm256_sub_ps(LOAD(w + d, left), step), left);                                            \
    )
#define FE_ADAGRAD_LANES(LOAD, STORE)                                                                         \
    const __m256 rate = _mm256_set1_ps(clr), e = _mm256_set1_ps(eps);                                         \
    FE_EACH_8_LANES(n,                                                                                         \
        const __m256 gd = LOAD(g + d, left);                                                                   \
        const __m256 sd = _mm256_add_ps(LOAD(s + d, left), _mm256_mul_ps(gd, gd));                             \
        const __m256 step = _mm256_div_ps(_mm256_mul_ps(rate, gd), _mm256_add_ps(_mm256_sqrt_ps(sd), e));      \
        STORE(s + d, sd, left);                                                                                \
        STORE(w + d, _mm256_sub_ps(LOAD(w + d, left), step), left);                                            \
    )
FE_F16C_FN static void fe_f16c_adam_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT m, uint16_t *FE_RESTRICT v,
                                        const uint16_t *FE_RESTRICT g, ptrdiff_t n, float lr, float beta1,
                                        float beta2, float eps, float inv_bias1, float inv_bias2) {
    FE_ADAM_LANES(fe_f16c_load, fe_f16c_store)
}
FE_F16C_FN static void fe_f16c_adagrad_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT s,
                                           const uint16_t *FE_RESTRICT g, ptrdiff_t n, float clr, float eps) {
    FE_ADAGRAD_LANES(fe_f16c_load, fe_f16c_store)
}
FE_AVX2_FN static void fe_avx2_bf16_adam_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT m,
                                             uint16_t *FE_RESTRICT v, const uint16_t *FE_RESTRICT g, ptrdiff_t n,
                                             float lr, float beta1, float beta2, float eps, float inv_bias1,
                                             float inv_bias2) {
    FE_ADAM_LANES(fe_avx2_bf16_load, fe_avx2_bf16_store)
}
FE_AVX2_FN static void fe_avx2_bf16_adagrad_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT s,
                                                const uint16_t *FE_RESTRICT g, ptrdiff_t n, float clr, float eps) {
    FE_ADAGRAD_LANES(fe_avx2_bf16_load, fe_avx2_bf16_store)
}
FE_AVX512BF16_FN static void fe_avx512_bf16_adam_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT m,
                                                     uint16_t *FE_RESTRICT v, const uint16_t *FE_RESTRICT g,
                                                     ptrdiff_t n, float lr, float beta1, float beta2, float eps,
                                                     float inv_bias1, float inv_bias2) {
    FE_ADAM_LANES(fe_avx2_bf16_load, fe_avx512_bf16_store)
}
FE_AVX512BF16_FN static void fe_avx512_bf16_adagrad_row(uint16_t *FE_RESTRICT w, uint16_t *FE_RESTRICT s,
                                                        const uint16_t *FE_RESTRICT g, ptrdiff_t n, float clr,
                                                        float eps) {
    FE_ADAGRAD_LANES(fe_avx2_bf16_load, fe_avx512_bf16_store)
}
#endif
static void fe_adam_row_f16(fe_f16 *FE_RESTRICT w, fe_f16 *FE_RESTRICT m, fe_f16 *FE_RESTRICT v,
                            const fe_f16 *FE_RESTRICT g, ptrdiff_t n, float lr, float beta1, float beta2, float eps,
                            float inv_bias1, float inv_bias2) {
#if FE_HAVE_F16C
    if (fe_use_f16c) {
        fe_f16c_adam_row((uint16_t *)w, (uint16_t *)m, (uint16_t *)v, (const uint16_t *)g, n, lr, beta1, beta2, eps,
                         inv_bias1, inv_bias2);
        return;
    }
#endif
    FE_ADAM_ELEMS16(fe_f16_to_float_sw, fe_float_to_f16_sw)
}
static void fe_adagrad_row_f16(fe_f16 *FE_RESTRICT w, fe_f16 *FE_RESTRICT s, const fe_f16 *FE_RESTRICT g,
                               ptrdiff_t n, float clr, float eps) {
#if FE_HAVE_F16C
    if (fe_use_f16c) { fe_f16c_adagrad_row((uint16_t *)w, (uint16_t *)s, (const uint16_t *)g, n, clr, eps); return; }
#endif
    FE_ADAGRAD_ELEMS16(fe_f16_to_float_sw, fe_float_to_f16_sw)
}
static void fe_adam_row_bf16(fe_bf16 *FE_RESTRICT w, fe_bf16 *FE_RESTRICT m, fe_bf16 *FE_RESTRICT v,
                             const fe_bf16 *FE_RESTRICT g, ptrdiff_t n, float lr, float beta1, float beta2, float eps,
                             float inv_bias1, float inv_bias2) {
#if FE_HAVE_F16C
    if (fe_use_avx512bf16) {
        fe_avx512_bf16_adam_row((uint16_t *)w, (uint16_t *)m, (uint16_t *)v, (const uint16_t *)g, n, lr, beta1,
                                beta2, eps, inv_bias1, inv_bias2);
        return;
    }
    if (fe_use_avx2) {
        fe_avx2_bf16_adam_row((uint16_t *)w, (uint16_t *)m, (uint16_t *)v, (const uint16_t *)g, n, lr, beta1, beta2,
                              eps, inv_bias1, inv_bias2);
        return;
    }
#endif
    fe_adam_row_bf16_sw(w, m, v, g, n, lr, beta1, beta2, eps, inv_bias1, inv_bias2);
}
static void fe_adagrad_row_bf16(fe_bf16 *FE_RESTRICT w, fe_bf16 *FE_RESTRICT s, const fe_bf16 *FE_RESTRICT g,
                                ptrdiff_t n, float clr, float eps) {
#if FE_HAVE_F16C
    if (fe_use_avx512bf16) {
        fe_avx512_bf16_adagrad_row((uint16_t *)w, (uint16_t *)s, (const uint16_t *)g, n, clr, eps);
        return;
    }
    if (fe_use_avx2) { fe_avx2_bf16_adagrad_row((uint16_t *)w, (uint16_t *)s, (const uint16_t *)g, n, clr, eps); return; }
#endif
    fe_adagrad_row_bf16_sw(w, s, g, n, clr, eps);
}

#if defined(__GNUC__) || defined(__clang__)
#define fe_prefetch(p) __builtin_prefetch((p), 0, 3)
#define fe_prefetch_write(p) __builtin_prefetch((p), 1, 3)
#else
#define fe_prefetch(p) ((void)0)
#define fe_prefetch_write(p) ((void)0)
#endif

/* ---------------------------------------------------------------- embedding bags (_bag_*.pxi) */

/* out[d] += s * a[d]: the product rounded, then the sum (the build turns FMA contraction off), as torch's
   per-lookup gradient `grad[bag] * weight` followed by an add. */
FE_CLONES static void fe_bag_axpy(float *FE_RESTRICT out, const float *FE_RESTRICT a, ptrdiff_t n, float s) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] += s * a[d];
}

/* Adds k float32 rows given by pointer to a bag's running sum, in their order: out = ((out + r0) + r1) + ...
   The sum is held in registers 32 columns at a time across the k rows, so out is read and written once per
   call, not once per row; the adds are the same, in the same order, as a row-by-row loop (the same bits:
   vector adds are lane by lane, and the build allows no regrouping: no -ffast-math, -ffp-contract=off). */
#if defined(__GNUC__)
typedef float fe_v8f __attribute__((vector_size(32)));
FE_CLONES static void fe_bag_sum_ptrs(float *FE_RESTRICT out, const float *const *FE_RESTRICT rows, ptrdiff_t k,
                                      ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 32 <= n; d += 32) {
        fe_v8f a0, a1, a2, a3;
        memcpy(&a0, out + d, 32); memcpy(&a1, out + d + 8, 32);
        memcpy(&a2, out + d + 16, 32); memcpy(&a3, out + d + 24, 32);
        for (ptrdiff_t j = 0; j < k; j++) {
            const float *r = rows[j] + d;
            fe_v8f b0, b1, b2, b3;
            memcpy(&b0, r, 32); memcpy(&b1, r + 8, 32); memcpy(&b2, r + 16, 32); memcpy(&b3, r + 24, 32);
            a0 += b0; a1 += b1; a2 += b2; a3 += b3;
        }
        memcpy(out + d, &a0, 32); memcpy(out + d + 8, &a1, 32);
        memcpy(out + d + 16, &a2, 32); memcpy(out + d + 24, &a3, 32);
    }
    for (; d + 8 <= n; d += 8) {
        fe_v8f a, b;
        memcpy(&a, out + d, 32);
        for (ptrdiff_t j = 0; j < k; j++) {
            memcpy(&b, rows[j] + d, 32);
            a += b;
        }
        memcpy(out + d, &a, 32);
    }
    for (; d < n; d++) {
        float a = out[d];
        for (ptrdiff_t j = 0; j < k; j++) a += rows[j][d];
        out[d] = a;
    }
}
#else
/* Row by row: the same adds per column in the same order, and a loop over d compilers vectorise without
   regrouping adds (a column's adds over rows held in one float would stay scalar). */
static void fe_bag_sum_ptrs(float *FE_RESTRICT out, const float *const *FE_RESTRICT rows, ptrdiff_t k, ptrdiff_t n) {
    for (ptrdiff_t j = 0; j < k; j++)
        for (ptrdiff_t d = 0; d < n; d++) out[d] += rows[j][d];
}
#endif

/* Float32 bags (mode "sum", or "mean" with mean set) of rows of exactly W floats (W = 32 or 64: the common
   widths), without per_sample_weights: the bags [b0, b1) of offs (L offsets; a bag ends where the next
   starts, the last at N), into out (a row of W per bag). Each bag's sum is held in W / 8 registers across its
   rows, the ids read directly, and written once: the first kept row enters as 0 + row, each next one is
   added, in ids order, then a mean is divided by its count; a bag with no kept row is zeros. These are the
   adds of the general loop of _bag_forward.pxi (fe_first_into, fe_bag_sum_ptrs, fe_bag_div), in the same order: the
   same bits. An id equal to pad is skipped; one outside [0, V) is skipped and counted (only a writer racing
   the call can make one: the checks refused them before). Rows ids[i + 8] are prefetched while i + 8 < last.
   Returns the count of ids skipped as outside. */
#if defined(__GNUC__)
#define FE_BAG_SUM_W_DECLARE(W) fe_v8f acc[W / 8]
#define FE_BAG_SUM_W_FIRST(W)                                                                                  \
    for (int k = 0; k < W / 8; k++) {                                                                          \
        fe_v8f x;                                                                                              \
        memcpy(&x, row + 8 * k, 32);                                                                           \
        acc[k] = (fe_v8f){0} + x;                                                                              \
    }
#define FE_BAG_SUM_W_ADD(W)                                                                                    \
    for (int k = 0; k < W / 8; k++) {                                                                          \
        fe_v8f x;                                                                                              \
        memcpy(&x, row + 8 * k, 32);                                                                           \
        acc[k] += x;                                                                                           \
    }
#define FE_BAG_SUM_W_DIV(W, c)                                                                                 \
    for (int k = 0; k < W / 8; k++) acc[k] /= (c);
#else
#define FE_BAG_SUM_W_DECLARE(W) float acc[W]
#define FE_BAG_SUM_W_FIRST(W) for (int k = 0; k < W; k++) acc[k] = 0.0f + row[k];
#define FE_BAG_SUM_W_ADD(W) for (int k = 0; k < W; k++) acc[k] += row[k];
#define FE_BAG_SUM_W_DIV(W, c) for (int k = 0; k < W; k++) acc[k] /= (c);
#endif
#define FE_DEFINE_BAG_SUM_W(NAME, INDEX, W)                                                                    \
    FE_CLONES static ptrdiff_t NAME(float *FE_RESTRICT out, const float *FE_RESTRICT table, int64_t V,         \
                                    const INDEX *FE_RESTRICT ids, const int64_t *FE_RESTRICT offs, ptrdiff_t L, \
                                    ptrdiff_t N, ptrdiff_t b0, ptrdiff_t b1, ptrdiff_t last, int64_t pad,      \
                                    int mean) {                                                                \
        ptrdiff_t skipped = 0;                                                                                 \
        for (ptrdiff_t b = b0; b < b1; b++) {                                                                  \
            const ptrdiff_t lo = (ptrdiff_t)offs[b], hi = b + 1 < L ? (ptrdiff_t)offs[b + 1] : N;              \
            FE_BAG_SUM_W_DECLARE(W);                                                                           \
            ptrdiff_t count = 0;                                                                               \
            for (ptrdiff_t i = lo; i < hi; i++) {                                                              \
                if (i + 8 < last) {                                                                            \
                    const char *p = (const char *)(table + (int64_t)ids[i + 8] * W);                          \
                    for (int c = 0; c < W * 4; c += 64) fe_prefetch(p + c);                                    \
                }                                                                                              \
                const int64_t r = (int64_t)ids[i];                                                             \
                if ((uint64_t)r >= (uint64_t)V) {                                                              \
                    skipped++;                                                                                 \
                    continue;                                                                                  \
                }                                                                                              \
                if (r == pad) continue;                                                                        \
                const float *row = table + r * W;                                                              \
                if (count++ == 0) {                                                                            \
                    FE_BAG_SUM_W_FIRST(W)                                                                      \
                } else {                                                                                       \
                    FE_BAG_SUM_W_ADD(W)                                                                        \
                }                                                                                              \
            }                                                                                                  \
            if (count == 0) {                                                                                  \
                memset(out + b * W, 0, W * sizeof(float));                                                     \
                continue;                                                                                      \
            }                                                                                                  \
            if (mean) {                                                                                        \
                const float c = (float)count;                                                                  \
                FE_BAG_SUM_W_DIV(W, c)                                                                         \
            }                                                                                                  \
            memcpy(out + b * W, acc, W * sizeof(float));                                                       \
        }                                                                                                      \
        return skipped;                                                                                        \
    }
FE_DEFINE_BAG_SUM_W(fe_bag_sum32_i32, int32_t, 32)
FE_DEFINE_BAG_SUM_W(fe_bag_sum32_i64, int64_t, 32)
FE_DEFINE_BAG_SUM_W(fe_bag_sum64_i32, int32_t, 64)
FE_DEFINE_BAG_SUM_W(fe_bag_sum64_i64, int64_t, 64)

/* A bag's running max: where a[d] > out[d], out[d] = a[d] and arg[d] = r. Strictly greater, as torch's CPU
   kernel: on a tie the earlier row stays, and a NaN already in out stays (NaN > x and x > NaN are false). */
FE_CLONES static void fe_bag_max(float *FE_RESTRICT out, int64_t *FE_RESTRICT arg, const float *FE_RESTRICT a,
                                 ptrdiff_t n, int64_t r) {
    for (ptrdiff_t d = 0; d < n; d++) {
        if (a[d] > out[d]) {
            out[d] = a[d];
            arg[d] = r;
        }
    }
}

/* A bag's running max over k float32 rows given by pointer (rows[j] is table row ids[j]), in their order:
   where rows[j][d] > out[d], out[d] = rows[j][d] and arg[d] = ids[j]. With first, rows[0] is the bag's first
   kept row: it is taken as is (its -0.0 and NaN included, arg = ids[0]) and out and arg are not read. Strictly
   greater as fe_bag_max, column by column in row order: the same result as k calls of it. arg NULL: the max
   only (nothing asked for the argmax).
   The columns go in blocks of up to 32 held in registers across the k rows, so out and arg are read and written
   once per call, not once per row. A block keeps, per column, the max and the position j of the row it came
   from (int32 lanes, -1 while it is still out's own): one compare, one max and one blend per 8 columns and
   row, where blending the int64 ids themselves took four more. arg is written once at the end, from ids[j].
   Four registers of max per block: four independent chains per row, not one.
   "b > m ? b : m" lane by lane is exactly x86's maxps(b, m) (the second operand where either is NaN or they
   are equal), so the AVX2 instance takes one maxps where the portable vectors blend on the compare. */
#if defined(__GNUC__)
typedef int fe_v8i __attribute__((vector_size(32)));
/* m where k is 0, b where it is all ones (k: a vector compare's result). A macro, not a function: a function
   taking and returning 32-byte vectors in the baseline (non-AVX) build draws GCC's -Wpsabi note on every build,
   although only the AVX2 clones call it. */
#define fe_blend8f(m, b, k) ((fe_v8f)(((fe_v8i)(b) & (k)) | ((fe_v8i)(m) & ~(k))))
#define fe_max8f_blend(b, m) fe_blend8f(m, b, (b) > (m))
/* The loops over the NV registers of a block are unrolled, so m and p stay in registers (a stack array and a
   block copy otherwise, whose halves stall the next 32-byte load). */
#define FE_UNROLL _Pragma("GCC unroll 4")
/* The loop over the blocks of NV x 8 columns from column d, in fe_bag_max_ptrs' scope; MAX(b, m) is
   "b > m ? b : m" on 8 lanes. */
#define FE_BAG_MAX_BLOCKS(NV, MAX, ARGS_FIRST)                                                                      \
    for (; d + 8 * (NV) <= n; d += 8 * (NV)) {                                                                \
        fe_v8f m[NV];                                                                                         \
        fe_v8i p[NV];                                                                                         \
        FE_UNROLL for (int v = 0; v < (NV); v++)                                                              \
            memcpy(&m[v], (first ? rows[0] : out) + d + 8 * v, 32);                                           \
        if (arg != NULL) {                                                                                    \
            fe_v8i jv = (fe_v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int)j0;                                           \
            FE_UNROLL for (int v = 0; v < (NV); v++)                                                          \
                p[v] = (fe_v8i){0, 0, 0, 0, 0, 0, 0, 0} + (first ? 0 : -1);                                   \
            for (ptrdiff_t j = j0; j < k; j++, jv += 1) {                                                     \
                FE_UNROLL for (int v = 0; v < (NV); v++) {                                                    \
                    fe_v8f b;                                                                                 \
                    memcpy(&b, rows[j] + d + 8 * v, 32);                                                      \
                    fe_v8i kk = b > m[v];                                                                     \
                    m[v] = MAX(b, m[v]);                                                                      \
                    p[v] = (jv & kk) | (p[v] & ~kk);                                                          \
                }                                                                                             \
            }                                                                                                 \
            if (first) {  /* every lane names a row; arg is not read (it may be fresh, unmapped pages) */     \
                ARGS_FIRST(arg + d, p, NV)                                                                    \
            } else {  /* branch-free: which lanes moved is data, not a pattern */                             \
                int32_t pj[8 * (NV)];                                                                         \
                memcpy(pj, p, sizeof pj);                                                                     \
                for (int c = 0; c < 8 * (NV); c++) {                                                          \
                    int64_t keep = (int64_t)(pj[c] >> 31);  /* all ones where the lane is still out's own */  \
                    int64_t moved = ids[pj[c] & ~(int32_t)keep];                                              \
                    arg[d + c] = (arg[d + c] & keep) | (moved & ~keep);                                       \
                }                                                                                             \
            }                                                                                                 \
        } else {                                                                                              \
            for (ptrdiff_t j = j0; j < k; j++) {                                                              \
                FE_UNROLL for (int v = 0; v < (NV); v++) {                                                    \
                    fe_v8f b;                                                                                 \
                    memcpy(&b, rows[j] + d + 8 * v, 32);                                                      \
                    m[v] = MAX(b, m[v]);                                                                      \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        FE_UNROLL for (int v = 0; v < (NV); v++) memcpy(out + d + 8 * v, &m[v], 32);                          \
    }
/* One instance of fe_bag_max_ptrs: the blocks of 32, 16 and 8 columns, then the tail column by column. */
#define FE_DEFINE_BAG_MAX_PTRS(NAME, ATTR, MAX, ARGS_FIRST)                                                         \
    ATTR static void NAME(float *FE_RESTRICT out, int64_t *FE_RESTRICT arg, const float *const *FE_RESTRICT rows, \
                          const int64_t *FE_RESTRICT ids, ptrdiff_t k, ptrdiff_t n, int first) {              \
        ptrdiff_t d = 0, j0 = first ? 1 : 0;                                                                  \
        FE_BAG_MAX_BLOCKS(4, MAX, ARGS_FIRST)                                                                 \
        FE_BAG_MAX_BLOCKS(2, MAX, ARGS_FIRST)                                                                 \
        FE_BAG_MAX_BLOCKS(1, MAX, ARGS_FIRST)                                                                 \
        if (d < n) {  /* under 8 columns left: row by row, out's and arg's tail stay in L1 */                 \
            if (first) {                                                                                      \
                memcpy(out + d, rows[0] + d, (size_t)(n - d) * sizeof(float));                               \
                if (arg != NULL)                                                                              \
                    for (ptrdiff_t c = d; c < n; c++) arg[c] = ids[0];                                        \
            }                                                                                                 \
            for (ptrdiff_t j = j0; j < k; j++) {                                                              \
                if (arg != NULL) {                                                                            \
                    fe_bag_max(out + d, arg + d, rows[j] + d, n - d, ids[j]);                                 \
                } else {                                                                                      \
                    for (ptrdiff_t c = d; c < n; c++)                                                         \
                        if (rows[j][c] > out[c]) out[c] = rows[j][c];                                         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }
/* ARGS_FIRST(dst, p, NV): dst[c] = ids[lane c of p] for the 8 NV lanes of a bag's first chunk (every lane
   names a row): lane by lane in the portable instance, four int64 ids per AVX2 gather in the other. */
#define fe_args_first_lanes(dst, p, NV)                                                                       \
    {                                                                                                         \
        int32_t pj[8 * (NV)];                                                                                 \
        memcpy(pj, p, sizeof pj);                                                                             \
        for (int c = 0; c < 8 * (NV); c++) (dst)[c] = ids[pj[c]];                                             \
    }
FE_DEFINE_BAG_MAX_PTRS(fe_bag_max_ptrs_vec, FE_CLONES, fe_max8f_blend, fe_args_first_lanes)
#if FE_HAVE_F16C
#define fe_max8f_avx2(b, m) ((fe_v8f)_mm256_max_ps((__m256)(b), (__m256)(m)))
#define fe_args_first_avx2(dst, p, NV)                                                                        \
    FE_UNROLL for (int v = 0; v < (NV); v++) {                                                                \
        const __m256i q = (__m256i)p[v];                                                                      \
        _mm256_storeu_si256((__m256i *)((dst) + 8 * v),                                                       \
                            _mm256_i32gather_epi64((const long long *)ids, _mm256_castsi256_si128(q), 8));    \
        _mm256_storeu_si256((__m256i *)((dst) + 8 * v + 4),                                                   \
                            _mm256_i32gather_epi64((const long long *)ids, _mm256_extracti128_si256(q, 1), 8)); \
    }
FE_DEFINE_BAG_MAX_PTRS(fe_bag_max_ptrs_avx2, FE_AVX2_FN, fe_max8f_avx2, fe_args_first_avx2)
#endif
/* The AVX2 instance where the CPU has it (and the test switch leaves it on), else the portable vectors. */
static inline void fe_bag_max_ptrs(float *FE_RESTRICT out, int64_t *FE_RESTRICT arg,
                                   const float *const *FE_RESTRICT rows, const int64_t *FE_RESTRICT ids,
                                   ptrdiff_t k, ptrdiff_t n, int first) {
#if FE_HAVE_F16C
    if (fe_use_avx2) {
        fe_bag_max_ptrs_avx2(out, arg, rows, ids, k, n, first);
        return;
    }
#endif
    fe_bag_max_ptrs_vec(out, arg, rows, ids, k, n, first);
}
#else
static void fe_bag_max_ptrs(float *FE_RESTRICT out, int64_t *FE_RESTRICT arg, const float *const *FE_RESTRICT rows,
                            const int64_t *FE_RESTRICT ids, ptrdiff_t k, ptrdiff_t n, int first) {
    ptrdiff_t j0 = first ? 1 : 0;
    for (ptrdiff_t d = 0; d < n; d++) {
        float m = first ? rows[0][d] : out[d];
        int64_t a = first ? ids[0] : (arg != NULL ? arg[d] : 0);
        for (ptrdiff_t j = j0; j < k; j++) {
            if (rows[j][d] > m) {
                m = rows[j][d];
                a = ids[j];
            }
        }
        out[d] = m;
        if (arg != NULL) arg[d] = a;
    }
}
#endif

/* out[d] = s * a[d]: a sparse gradient's entry, written (not added to +0.0, which would turn -0.0 into +0.0). */
FE_CLONES static void fe_bag_scale(float *FE_RESTRICT out, const float *FE_RESTRICT a, ptrdiff_t n, float s) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] = s * a[d];
}

/* out[d] /= c: a mean bag's sum divided by its count (a division, not a reciprocal's product, as torch's
   forward `output /= bag_size`). */
FE_CLONES static void fe_bag_div(float *FE_RESTRICT out, ptrdiff_t n, float c) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] /= c;
}

/* The dot product in column order, one float32 rounding per step (a fixed order a transcription can follow). */
static inline float fe_bag_dot(const float *a, const float *b, ptrdiff_t n) {
    float acc = 0.0f;
    for (ptrdiff_t d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

#endif
