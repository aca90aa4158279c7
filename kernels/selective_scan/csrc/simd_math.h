/* Vectorisable float32 math shared by the CPU kernels (see selective_scan_cpu.c for why these exist:
 * libm calls do not vectorise without -ffast-math, which may set flush-to-zero process-wide). */
#ifndef VIM2_SIMD_MATH_H
#define VIM2_SIMD_MATH_H
#include <stdint.h>
#include <string.h>

#ifndef LANES
#define LANES 32  /* rows processed together: two AVX-512 registers of float32 (measured: 15-35% faster than 16,
                     which leaves fewer independent operations per step; 64 helps little more and halves the tiles) */
#endif

static inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  /* k = round(x / ln2) by the float shifter 1.5 * 2^23 (+ 127, the exponent bias): after the add, the
     low mantissa bits of kf hold k + 127, and kf - shifter is k exactly (no float<->int conversions) */
  const float shifter = 12582912.0f + 127.0f;
  float kf = x * 1.44269504088896341f + shifter;
  float fk = kf - shifter;
  float r = x - fk * 0.693145751953125f - fk * 1.428606765330187e-06f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
            + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  uint32_t bits;
  memcpy(&bits, &kf, sizeof bits);
  bits <<= 23;  /* (k + 127) << 23: the shifter's own bits leave at the top */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

/* log(w) for w >= 1 (finite): exponent from the bits, atanh series of the mantissa in [0.707, 1.414). */
static inline float log_vec(float w) {
  int32_t bits;
  memcpy(&bits, &w, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
  float m;
  memcpy(&m, &mbits, sizeof m);
  int big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  float s = (m - 1.0f) / (m + 1.0f);
  float s2 = s * s;
  float lm = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
  return lm + (float)e * 0.693147180559945309f;
}

/* 1 if x is NaN. Integer test on the bits: -ffinite-math-only lets the compiler fold `x != x` away. */
static inline int is_nan_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  return (b & 0x7fffffffu) > 0x7f800000u;
}

/* softplus(v) = log(1 + exp(v)); v itself above 20 (as mamba). A NaN step size stays NaN (the clamps
   in exp_vec would turn it into a finite number and hide a diverging model). */
static inline float softplus_vec(float v) {
  float e = exp_vec(v < 20.0f ? v : 20.0f);
  float small = e * (1.0f - e * (0.5f - e * (1.0f / 3)));  /* log1p(e) for e < 1e-3 */
  float sp = e < 1e-3f ? small : log_vec(1.0f + e);
  float r = v > 20.0f ? v : sp;
  return is_nan_bits(v) ? v : r;
}

static inline float sigmoid_vec(float v) { return 1.0f / (1.0f + exp_vec(-v)); }

/* dt[j] = softplus(v[j]) or v[j]; the branch is outside the lane loop so that the loop vectorises. */
static inline void step_sizes(int softplus, const float *v, float *dt) {
  if (softplus)
    for (int j = 0; j < LANES; j++) dt[j] = softplus_vec(v[j]);
  else
    for (int j = 0; j < LANES; j++) dt[j] = v[j];
}

/* Sum of the lanes as a tree (vectorisable; a left-to-right sum is a serial chain). */
static inline float lane_sum(const float *x) {
  float a[LANES];
  for (int j = 0; j < LANES; j++) a[j] = x[j];
  for (int width = LANES / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; j++) a[j] += a[j + width];
  return a[0];
}

#endif
