/* Small portability shims for _kernels.pyx: OpenMP queries, bit tricks, prefetch, and the row loops. */
#ifndef FASTEMBED_H
#define FASTEMBED_H
#include <stdint.h>
#include <stddef.h>
#include <math.h>

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

/* One Adam update of n elements, all in float32: m, v move towards g; w moves by the bias-corrected
   ratio. Corrections arrive as reciprocals, leaving one division and one sqrt per element. */
FE_CLONES static void fe_adam_row(float *FE_RESTRICT w, float *FE_RESTRICT m, float *FE_RESTRICT v,
                                  const float *FE_RESTRICT g, ptrdiff_t n, float lr, float beta1, float beta2,
                                  float eps, float inv_bias1, float inv_bias2) {
    const float keep1 = 1.0f - beta1, keep2 = 1.0f - beta2;
    for (ptrdiff_t d = 0; d < n; d++) {
        float gd = g[d];
        float md = beta1 * m[d] + keep1 * gd;
        float vd = beta2 * v[d] + keep2 * (gd * gd);
        m[d] = md;
        v[d] = vd;
        w[d] -= lr * (md * inv_bias1) / (sqrtf(vd * inv_bias2) + eps);
    }
}

/* One SGD update of n elements: w[d] = w[d] - lr * g[d] (the product rounded first, as numpy's
   `w -= lr * g` rounds it). */
FE_CLONES static void fe_sgd_row(float *FE_RESTRICT w, const float *FE_RESTRICT g, ptrdiff_t n, float lr) {
    for (ptrdiff_t d = 0; d < n; d++) w[d] -= lr * g[d];
}

/* The same update with torch's rounding: w[d] = fma(-lr, g[d], w[d]), one rounding (what torch's
   `param.add_(grad, alpha=-lr)` gives on CPU). The "fma" clone (FMA3 and AVX) does it in hardware and is
   picked on every CPU with FMA; the default clone calls libm's fmaf, exact too, about 3x slower. Not
   "arch=haswell" (the resolver asks for that CPU model, so a newer CPU got the default) nor an "avx2"
   clone beside it (the resolver prefers avx2, which has no FMA). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FE_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FE_FMA_CLONES
#endif
FE_FMA_CLONES static void fe_sgd_row_fma(float *FE_RESTRICT w, const float *FE_RESTRICT g, ptrdiff_t n, float lr) {
    const float neg = -lr;
    for (ptrdiff_t d = 0; d < n; d++) w[d] = fmaf(neg, g[d], w[d]);
}

/* One Adagrad update of n elements, in torch's order for a dense gradient: the sum of squares grows by
   g^2, then w moves by (clr * g) / (sqrt(sum) + eps). */
FE_CLONES static void fe_adagrad_row(float *FE_RESTRICT w, float *FE_RESTRICT s, const float *FE_RESTRICT g,
                                     ptrdiff_t n, float clr, float eps) {
    for (ptrdiff_t d = 0; d < n; d++) {
        float gd = g[d];
        float sd = s[d] + gd * gd;
        s[d] = sd;
        w[d] -= clr * gd / (sqrtf(sd) + eps);
    }
}

/* The sum of g[d]^2 in column order: a fixed order, so that a float32 transcription gives the same bits
   (without -ffast-math the compiler keeps this loop's order; the sum is one pass over a row that the
   update below then reads from cache). */
static inline float fe_sum_squares(const float *g, ptrdiff_t n) {
    float acc = 0.0f;
    for (ptrdiff_t d = 0; d < n; d++) acc += g[d] * g[d];
    return acc;
}

/* w[d] -= (lr * g[d]) / std: the row-wise Adagrad update, one std (sqrt of the row's sum, plus eps) per row. */
FE_CLONES static void fe_scaled_row(float *FE_RESTRICT w, const float *FE_RESTRICT g, ptrdiff_t n, float lr,
                                    float std) {
    for (ptrdiff_t d = 0; d < n; d++) w[d] -= lr * g[d] / std;
}

#if defined(__GNUC__) || defined(__clang__)
#define fe_prefetch(p) __builtin_prefetch((p), 0, 3)
#define fe_prefetch_write(p) __builtin_prefetch((p), 1, 3)
#else
#define fe_prefetch(p) ((void)0)
#define fe_prefetch_write(p) ((void)0)
#endif

/* ---------------------------------------------------------------- embedding bags (_bag.pxi) */

/* out[d] += s * a[d]: the product rounded, then the sum (the build turns FMA contraction off), as torch's
   per-lookup gradient `grad[bag] * weight` followed by an add. */
FE_CLONES static void fe_bag_axpy(float *FE_RESTRICT out, const float *FE_RESTRICT a, ptrdiff_t n, float s) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] += s * a[d];
}

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
