/* Vectorisable float32 math shared by the CPU kernels (see selective_scan_cpu.c for why these exist:
 * libm calls do not vectorise without -ffast-math, which may set flush-to-zero process-wide). */
#ifndef VIM2_SIMD_MATH_H
#define VIM2_SIMD_MATH_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#define LOG2E_F 1.44269504088896341f

/* 2^f for f in [0, 1]: minimax degree-5 polynomial for relative error (fitted for this file by Remez
   iterations; 7.5e-8 before float32 rounding, at most 1.55e-7 = 1.3 ulp as evaluated, measured over every
   float in [-1, 1] and a grid to +-20). Degree 6 was 0.7 ulp at one more FMA per 16 decays: the decays
   are the scans' bottleneck, and a decay's relative error enters the state like the reference's own
   float32 exp (about 1 ulp). */
static inline float exp2_reduced(float f) {
  return 0.99999994f + f * (0.693153083f + f * (0.240153611f + f * (0.0558263175f + f * (0.00898933969f
         + f * 0.00187757669f))));
}

/* 2^x with floor reduction (x = k + f, f in [0, 1]) by the float shifter, clamped to normal results. */
static inline float exp2_vec(float x) {
  x = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
  const float shifter = 12582912.0f + 127.0f;
  /* nearest(x - 0.5) is floor(x) (or x itself at an integer x, where f = 1 or 0 are both exact) */
  float kf = (x - 0.5f) + shifter;
  float fk = kf - shifter;
  uint32_t bits;
  memcpy(&bits, &kf, sizeof bits);
  bits <<= 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return exp2_reduced(x - fk) * scale;
}

/* out[j] = 2^x[j] for the LANES lanes (may alias). The scans' decays exp(dt * a) are computed as
   2^(dt * a * log2(e)) with a * log2(e) precomputed: one multiply per element instead of the Cody-Waite
   reduction. With AVX-512 the reduction is one vreduceps (x - floor(x); AVX512DQ) and the scaling one
   vscalefps, which also handles underflow and NaN: 7 vector instructions per 16 lanes (there were 10, and
   vrndscaleps is two uops: measured here, 2.0 against 3.2 ns per 16 decays) against exp_vec's 15. */
static inline void exp2_lanes(const float *x, float *out) {
#if defined(__AVX512F__) && LANES % 16 == 0
  for (int j = 0; j < LANES; j += 16) {
    __m512 v = _mm512_loadu_ps(x + j);
#if defined(__AVX512DQ__)
    __m512 f = _mm512_reduce_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  /* v - floor(v), one uop */
#else
    __m512 f = _mm512_sub_ps(v, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#endif
    __m512 p = _mm512_set1_ps(0.00187757669f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00898933969f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0558263175f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240153611f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693153083f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999994f));
    /* vscalefps multiplies by 2^floor(v) itself: no separate k; it underflows gradually to 0 and keeps NaN */
    _mm512_storeu_ps(out + j, _mm512_scalef_ps(p, v));
  }
#else
  for (int j = 0; j < LANES; j++) out[j] = exp2_vec(x[j]);
#endif
}

/* The scans' decays of one state for the LANES lanes: e[j] = exp(dt[j] * a[j]) with a2 = a * log2(e). */
static inline void decay_lanes(const float *dt, const float *a2, float *e) {
  for (int j = 0; j < LANES; j++) e[j] = dt[j] * a2[j];
  exp2_lanes(e, e);
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

/* d softplus_vec(v) / dv: sigmoid(v), and 1 above the threshold where softplus_vec returns v itself. */
static inline float softplus_grad_vec(float v) { return v > 20.0f ? 1.0f : sigmoid_vec(v); }

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

/* out[r] = sum of the LANES lanes of x[r] for r < rows. With AVX-512 and 32 lanes, 16 rows at a time
   by a transposing reduction (about 4 instructions per row instead of a 5-level tree per row). */
static inline void lane_sums(const float (*x)[LANES], int64_t rows, float *out) {
  int64_t r = 0;
#if defined(__AVX512F__) && LANES == 32
  for (; r + 16 <= rows; r += 16) {
    __m512 v[16], w[8], q[4], y[2];
    /* slot s takes row (s % 4) * 4 + s / 4: the 4x4 transpose that the last step undoes */
    for (int s = 0; s < 16; s++) {
      const float *row = x[r + (s % 4) * 4 + s / 4];
      v[s] = _mm512_add_ps(_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16));
    }
    /* w[k]: 256-bit halves hold 8 partial sums of v[2k] and of v[2k + 1] */
    for (int k = 0; k < 8; k++)
      w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    /* q[k]: 128-bit lane i holds 4 partial sums of v[4k + i] */
    for (int k = 0; k < 4; k++)
      q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
    /* y[k]: lane i = [a, b, a, b] pairs of partials of q[2k] (a) and q[2k + 1] (b) */
    for (int k = 0; k < 2; k++)
      y[k] = _mm512_add_ps(_mm512_unpacklo_ps(q[2 * k], q[2 * k + 1]), _mm512_unpackhi_ps(q[2 * k], q[2 * k + 1]));
    /* element e of lane i: the sum of slot 4e + i, i.e. of row 4i + e: rows in order */
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]));
    _mm512_storeu_ps(out + r, _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi)));
  }
#endif
  for (; r < rows; r++) out[r] = lane_sum(x[r]);
}

#endif
