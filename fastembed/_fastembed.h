/* Small portability shims for _kernels.pyx: OpenMP queries and bit tricks. */
#ifndef FASTEMBED_H
#define FASTEMBED_H
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
static inline int fe_omp_max_threads(void) { return omp_get_max_threads(); }
static inline int fe_openmp_enabled(void) { return 1; }
#else
static inline int fe_omp_max_threads(void) { return 1; }
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

#if defined(__GNUC__) || defined(__clang__)
#define fe_prefetch(p) __builtin_prefetch((p), 0, 3)
#define fe_prefetch_write(p) __builtin_prefetch((p), 1, 3)
#else
#define fe_prefetch(p) ((void)0)
#define fe_prefetch_write(p) ((void)0)
#endif

#endif
