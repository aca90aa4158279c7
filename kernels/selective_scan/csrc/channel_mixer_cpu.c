/* ViM2 selective channel mixer, fused: per-direction channel conv + SiLU + affine Δ/B/C + bidirectional
 * S6 along each token's channel axis + gate, forward and backward, float32, for CPUs.
 *
 * For token t (a row of v: (T, E)) and direction r (0: c = 0..E-1, 1: c = E-1..0), in the direction's
 * own scan order s (position c = pos_r(s)):
 *   pre_s  = conv_b[r] + sum_k conv_w[r, k] * v[pos_r(s - (K-1) + k)]     (zero outside 0..E-1)
 *   x_s    = silu(pre_s)
 *   dt_s   = softplus(delta_w[r] * x_s + delta_b[r, c])
 *   B_s[n] = x_s * B_w[r, n] + B_b[r, n, c];  C_s[n] = x_s * C_w[r, n] + C_b[r, n, c]
 *   h      = exp(dt_s A[r, n]) h + dt_s B_s[n] x_s;  y_r[c] = sum_n C_s[n] h[n] + D[r] x_s
 *   out[c] = (y_0[c] + y_1[c]) * silu(z[c])       (no gate when z is NULL)
 * Only v, z and the small parameters are read: the (T, E) conv outputs and the (T, N, E) B/C of the
 * unfused formulation are never materialised. The forward keeps nothing for backward: backward
 * recomputes a tile's states (E * N * LANES floats per direction, per thread) and walks back.
 *
 * Lanes are LANES (32) consecutive tokens. Parameter gradients are per-thread partials summed by the caller.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include "simd_math.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define CM_MAX_STATE 64
#define CM_MAX_CONV 8

enum { CM_T, CM_E, CM_N, CM_K, CM_THREADS, CM_SHAPE_COUNT };

typedef struct {
  const float *conv_w, *conv_b, *delta_w, *delta_b, *B_w, *B_b, *C_w, *C_b, *A, *D;
} ChannelParams;

/* gradient partials of one thread, same layouts as the parameters with a leading direction axis */
typedef struct {
  float *conv_w, *conv_b, *delta_w, *delta_b, *B_w, *B_b, *C_w, *C_b, *A, *D;
} ChannelGrads;

/* T, E, N, K, nthreads, n_tiles from the shape vector; status 3 when N or K exceeds the fixed arrays */
#define CM_UNPACK_SHAPE(shape)                                                             \
  const int64_t T = (shape)[CM_T], E = (shape)[CM_E], N = (shape)[CM_N], K = (shape)[CM_K];  \
  const int nthreads = (int)((shape)[CM_THREADS] < 1 ? 1 : (shape)[CM_THREADS]);              \
  const int64_t n_tiles = (T + LANES - 1) / LANES;                                         \
  (void)nthreads;                                                                          \
  if (N > CM_MAX_STATE || K > CM_MAX_CONV) return 3

static inline int64_t cm_pos(int r, int64_t s, int64_t E) { return r ? E - 1 - s : s; }

static inline float silu_f(float x) { return x * sigmoid_vec(x); }

/* Loads the tile's rows of a (T, E) tensor into buf[c][j] (padded lanes repeat the last token). */
static void load_tile(const float *p, int64_t st, int64_t se, int64_t t0, int64_t T, int64_t E,
                      float (*buf)[LANES]) {
  for (int j = 0; j < LANES; j++) {
    int64_t t = t0 + j < T ? t0 + j : T - 1;
    const float *row = p + t * st;
    for (int64_t c = 0; c < E; c++) buf[c][j] = row[c * se];
  }
}

static void store_tile(float *p, int64_t t0, int64_t T, int64_t E, float (*buf)[LANES]) {
  for (int j = 0; j < LANES && t0 + j < T; j++) {
    float *row = p + (t0 + j) * E;
    for (int64_t c = 0; c < E; c++) row[c] = buf[c][j];
  }
}

/* conv + SiLU input of step s of direction r: pre-activation into pre[j] */
static inline void conv_step(const ChannelParams *p, int r, int64_t s, int64_t E, int64_t K,
                             float (*vbuf)[LANES], float *pre) {
  float b = p->conv_b[r];
  for (int j = 0; j < LANES; j++) pre[j] = b;
  for (int64_t k = 0; k < K; k++) {
    int64_t sk = s - (K - 1) + k;
    if (sk < 0) continue;
    float w = p->conv_w[r * K + k];
    float *vv = vbuf[cm_pos(r, sk, E)];
    for (int j = 0; j < LANES; j++) pre[j] += w * vv[j];
  }
}

/* One direction over the tile. xs/dts (E x LANES) receive every step's SiLU(conv) and step size; if
 * hs/vdts/pres are given, the states, softplus inputs and conv outputs are recorded too (not the decays:
 * backward computes them again, cheaper than reading them back, as in selective_scan_cpu.c). */
static void cm_direction(const ChannelParams *p, int r, int64_t E, int64_t N, int64_t K,
                         float (*vbuf)[LANES], float (*ybuf)[LANES], int accumulate,
                         float *hs, float (*xs)[LANES], float (*dts)[LANES],
                         float (*vdts)[LANES], float (*pres)[LANES]) {
  float h[CM_MAX_STATE][LANES], a2[CM_MAX_STATE];
  for (int64_t n = 0; n < N; n++) {
    const float an = p->A[r * N + n];
    a2[n] = an * LOG2E_F;  /* decay exp(dt * a) = 2^(dt * a2), as in the scan kernels */
    for (int j = 0; j < LANES; j++) h[n][j] = is_nan_bits(an) ? an : 0.0f;  /* NaN in A stays visible */
  }
  const float dw = p->delta_w[r], dskip = p->D[r];
  /* element-wise prologue over all positions: conv, SiLU and step sizes do not depend on the state, so
     their latencies overlap here instead of stalling every step of the recurrence */
  for (int64_t s = 0; s < E; s++) {
    float pre[LANES], vdt[LANES];
    conv_step(p, r, s, E, K, vbuf, pre);
    const float db = p->delta_b[r * E + cm_pos(r, s, E)];
    for (int j = 0; j < LANES; j++) {
      xs[s][j] = silu_f(pre[j]);
      vdt[j] = dw * xs[s][j] + db;
    }
    step_sizes(1, vdt, dts[s]);
    if (pres)
      for (int j = 0; j < LANES; j++) {
        vdts[s][j] = vdt[j];
        pres[s][j] = pre[j];
      }
  }
  for (int64_t s = 0; s < E; s++) {
    int64_t c = cm_pos(r, s, E);
    float x[LANES], dt[LANES], dtx[LANES], y[LANES];  /* local copies: no aliasing with the records */
    for (int j = 0; j < LANES; j++) {
      x[j] = xs[s][j];
      dt[j] = dts[s][j];
    }
    for (int j = 0; j < LANES; j++) {
      dtx[j] = dt[j] * x[j];
      y[j] = dskip * x[j];
    }
    for (int64_t n = 0; n < N; n++) {
      const float bw = p->B_w[r * N + n], bb = p->B_b[(r * N + n) * E + c];
      const float cw = p->C_w[r * N + n], cb = p->C_b[(r * N + n) * E + c];
      float *hrec = hs ? hs + (s * N + n) * LANES : NULL;
      float e[LANES];
      for (int j = 0; j < LANES; j++) e[j] = dt[j] * a2[n];
      exp2_lanes(e, e);
      for (int j = 0; j < LANES; j++) {
        float hn = e[j] * h[n][j] + dtx[j] * (x[j] * bw + bb);
        h[n][j] = hn;
        y[j] += hn * (x[j] * cw + cb);
      }
      if (hrec)
        for (int j = 0; j < LANES; j++) hrec[j] = h[n][j];
    }
    if (accumulate)
      for (int j = 0; j < LANES; j++) ybuf[c][j] += y[j];
    else
      for (int j = 0; j < LANES; j++) ybuf[c][j] = y[j];
  }
}

static ChannelParams cm_params(const float *conv_w, const float *conv_b, const float *delta_w,
                               const float *delta_b, const float *B_w, const float *B_b, const float *C_w,
                               const float *C_b, const float *A, const float *D) {
  ChannelParams p = {conv_w, conv_b, delta_w, delta_b, B_w, B_b, C_w, C_b, A, D};
  return p;
}

int vim2_channel_mixer_fwd(const int64_t *shape, const float *v, int64_t sv_t, int64_t sv_e,
                           const float *z, int64_t sz_t, int64_t sz_e,
                           const float *conv_w, const float *conv_b, const float *delta_w, const float *delta_b,
                           const float *B_w, const float *B_b, const float *C_w, const float *C_b,
                           const float *A, const float *D, float *out) {
  CM_UNPACK_SHAPE(shape);
  const ChannelParams p = cm_params(conv_w, conv_b, delta_w, delta_b, B_w, B_b, C_w, C_b, A, D);
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    float (*vbuf)[LANES] = malloc(sizeof(float) * (size_t)(5 * E * LANES));
    float (*ybuf)[LANES] = vbuf + E, (*zbuf)[LANES] = ybuf + E, (*xs)[LANES] = zbuf + E, (*dts)[LANES] = xs + E;
    if (!vbuf) failed = 1;
#pragma omp for schedule(dynamic, 4)
    for (int64_t tile = 0; tile < n_tiles; tile++) {
      if (!vbuf) continue;
      const int64_t t0 = tile * LANES;
      load_tile(v, sv_t, sv_e, t0, T, E, vbuf);
      cm_direction(&p, 0, E, N, K, vbuf, ybuf, 0, NULL, xs, dts, NULL, NULL);
      cm_direction(&p, 1, E, N, K, vbuf, ybuf, 1, NULL, xs, dts, NULL, NULL);
      if (z) {
        load_tile(z, sz_t, sz_e, t0, T, E, zbuf);
        for (int64_t c = 0; c < E; c++)
          for (int j = 0; j < LANES; j++) ybuf[c][j] *= silu_f(zbuf[c][j]);
      }
      store_tile(out, t0, T, E, ybuf);
    }
    free(vbuf);
  }
  return failed ? 2 : 0;
}

/* Gradient partials: every g_* pointer is (threads, 2, ...) like its parameter; dv, dz are (T, E). */
int vim2_channel_mixer_bwd(const int64_t *shape, const float *v, int64_t sv_t, int64_t sv_e,
                           const float *z, int64_t sz_t, int64_t sz_e, const float *dout, int64_t sd_t, int64_t sd_e,
                           const float *conv_w, const float *conv_b, const float *delta_w, const float *delta_b,
                           const float *B_w, const float *B_b, const float *C_w, const float *C_b,
                           const float *A, const float *D, float *dv, float *dz,
                           float *g_conv_w, float *g_conv_b, float *g_delta_w, float *g_delta_b,
                           float *g_B_w, float *g_B_b, float *g_C_w, float *g_C_b, float *g_A, float *g_D) {
  CM_UNPACK_SHAPE(shape);
  const ChannelParams p = cm_params(conv_w, conv_b, delta_w, delta_b, B_w, B_b, C_w, C_b, A, D);
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
#ifdef _OPENMP
    const int64_t thread = omp_get_thread_num();
#else
    const int64_t thread = 0;
#endif
    ChannelGrads gr = {g_conv_w + thread * 2 * K, g_conv_b + thread * 2, g_delta_w + thread * 2,
                       g_delta_b + thread * 2 * E, g_B_w + thread * 2 * N, g_B_b + thread * 2 * N * E,
                       g_C_w + thread * 2 * N, g_C_b + thread * 2 * N * E, g_A + thread * 2 * N, g_D + thread * 2};
    /* per-thread scratch: v, y, z, gy, dv tiles (5 E), per-step records x, dt, vdt, pre (4 E), states
       (E N) -- all times LANES floats */
    float *scratch = malloc(sizeof(float) * (size_t)((9 * E + E * N) * LANES));
    if (!scratch) failed = 1;
    float (*vbuf)[LANES] = (float (*)[LANES])scratch;
    float (*ybuf)[LANES] = vbuf + E, (*zbuf)[LANES] = ybuf + E, (*gybuf)[LANES] = zbuf + E;
    float (*dvbuf)[LANES] = gybuf + E, (*xs)[LANES] = dvbuf + E, (*dts)[LANES] = xs + E;
    float (*vdts)[LANES] = dts + E, (*pres)[LANES] = vdts + E;
    float *hs = (float *)(pres + E);
#pragma omp for schedule(static)  /* reproducible per-thread gradient partials (see selective_scan_cpu.c) */
    for (int64_t tile = 0; tile < n_tiles; tile++) {
      if (!scratch) continue;
      const int64_t t0 = tile * LANES;
      int valid[LANES];
      for (int j = 0; j < LANES; j++) valid[j] = t0 + j < T;
      load_tile(v, sv_t, sv_e, t0, T, E, vbuf);
      load_tile(dout, sd_t, sd_e, t0, T, E, gybuf);
      if (z) load_tile(z, sz_t, sz_e, t0, T, E, zbuf);
      for (int64_t c = 0; c < E; c++)
        for (int j = 0; j < LANES; j++) {
          dvbuf[c][j] = 0.0f;
          ybuf[c][j] = 0.0f;
          if (!valid[j]) gybuf[c][j] = 0.0f;  /* padded lanes contribute nothing */
        }
      if (z)
        for (int64_t c = 0; c < E; c++)
          for (int j = 0; j < LANES; j++) gybuf[c][j] *= silu_f(zbuf[c][j]);
      for (int r = 0; r < 2; r++) {
        cm_direction(&p, r, E, N, K, vbuf, ybuf, 1, hs, xs, dts, vdts, pres);
        float G[CM_MAX_STATE][LANES], a[CM_MAX_STATE], bw[CM_MAX_STATE], cw[CM_MAX_STATE];
        float gBw[CM_MAX_STATE][LANES], gCw[CM_MAX_STATE][LANES], gA[CM_MAX_STATE][LANES];
        float gD[LANES], gdw[LANES], gcb[LANES], gcw[CM_MAX_CONV][LANES];
        float a2[CM_MAX_STATE];
        for (int64_t n = 0; n < N; n++) {
          a[n] = A[r * N + n];
          a2[n] = a[n] * LOG2E_F;  /* as in cm_direction: the same decays, bit for bit */
          bw[n] = B_w[r * N + n];
          cw[n] = C_w[r * N + n];
          for (int j = 0; j < LANES; j++) G[n][j] = gBw[n][j] = gCw[n][j] = gA[n][j] = 0.0f;
        }
        for (int j = 0; j < LANES; j++) gD[j] = gdw[j] = gcb[j] = 0.0f;
        for (int64_t k = 0; k < K; k++)
          for (int j = 0; j < LANES; j++) gcw[k][j] = 0.0f;
        const float dw = delta_w[r], dskip = D[r];
        for (int64_t s = E - 1; s >= 0; s--) {
          const int64_t c = cm_pos(r, s, E);
          float *x = xs[s], *dt = dts[s], *gy = gybuf[c];
          float dx[LANES], ddt[LANES], dtx[LANES];
          for (int j = 0; j < LANES; j++) {
            dx[j] = dskip * gy[j];
            gD[j] += gy[j] * x[j];
            dtx[j] = dt[j] * x[j];
          }
          /* Per state n, with Gn = dL/dh = gy C_n + (carry in G), q = Gn e h_prev: dC_b = gy h,
             dB_b = Gn dt x (their lane sums), C_w/B_w gradients x times those, dA += q dt, G <- Gn e; and
             over n, with dt and x factored out: dx += gy sum(h C_w) + dt x sum(Gn B_w) + dt sum(Gn B_n),
             ddt = x sum(Gn B_n) + sum(A q). Four sums over n, each split into two interleaved partials. */
          float hc2[2][LANES] = {{0.0f}}, gbw2[2][LANES] = {{0.0f}}, gb2[2][LANES] = {{0.0f}},
                qa2[2][LANES] = {{0.0f}};
          float dCs[CM_MAX_STATE][LANES], dBs[CM_MAX_STATE][LANES];
          for (int64_t n = 0; n < N; n++) {
            const float bb = B_b[(r * N + n) * E + c], cb = C_b[(r * N + n) * E + c];
            const float *h = hs + (s * N + n) * LANES;
            const float *hp = s > 0 ? hs + ((s - 1) * N + n) * LANES : NULL;
            float e[LANES];  /* the decay of this step, bitwise the forward's */
            for (int j = 0; j < LANES; j++) e[j] = dt[j] * a2[n];
            exp2_lanes(e, e);
            for (int j = 0; j < LANES; j++) {
              float Bn = x[j] * bw[n] + bb, Cn = x[j] * cw[n] + cb;
              float hprev = hp ? hp[j] : 0.0f;
              float Gn = G[n][j] + gy[j] * Cn, carry = Gn * e[j], q = carry * hprev;
              float dC = gy[j] * h[j], dB = Gn * dtx[j];
              dCs[n][j] = dC;
              dBs[n][j] = dB;
              gCw[n][j] += dC * x[j];
              gBw[n][j] += dB * x[j];
              hc2[n & 1][j] += h[j] * cw[n];
              gbw2[n & 1][j] += Gn * bw[n];
              gb2[n & 1][j] += Gn * Bn;
              qa2[n & 1][j] += a[n] * q;
              gA[n][j] += q * dt[j];
              G[n][j] = carry;
            }
          }
          float sc[CM_MAX_STATE], sb[CM_MAX_STATE];
          lane_sums((const float (*)[LANES])dCs, N, sc);
          lane_sums((const float (*)[LANES])dBs, N, sb);
          for (int64_t n = 0; n < N; n++) {
            gr.C_b[(r * N + n) * E + c] += sc[n];
            gr.B_b[(r * N + n) * E + c] += sb[n];
          }
          for (int j = 0; j < LANES; j++) {
            float gb = gb2[0][j] + gb2[1][j];
            dx[j] += gy[j] * (hc2[0][j] + hc2[1][j]) + dtx[j] * (gbw2[0][j] + gbw2[1][j]) + dt[j] * gb;
            ddt[j] = x[j] * gb + (qa2[0][j] + qa2[1][j]);
          }
          float dvdt[LANES], dpre[LANES];
          for (int j = 0; j < LANES; j++) {
            float vv = vdts[s][j];
            dvdt[j] = ddt[j] * softplus_grad_vec(vv);
            gdw[j] += dvdt[j] * x[j];
            dx[j] += dvdt[j] * dw;
            float pr = pres[s][j], sg = sigmoid_vec(pr);
            dpre[j] = dx[j] * sg * (1.0f + pr * (1.0f - sg));
            gcb[j] += dpre[j];
          }
          gr.delta_b[r * E + c] += lane_sum(dvdt);
          for (int64_t k = 0; k < K; k++) {
            int64_t sk = s - (K - 1) + k;
            if (sk < 0) continue;
            int64_t ck = cm_pos(r, sk, E);
            float w = conv_w[r * K + k];
            for (int j = 0; j < LANES; j++) {
              gcw[k][j] += dpre[j] * vbuf[ck][j];
              dvbuf[ck][j] += w * dpre[j];
            }
          }
        }
        for (int64_t n = 0; n < N; n++) {
          gr.B_w[r * N + n] += lane_sum(gBw[n]);
          gr.C_w[r * N + n] += lane_sum(gCw[n]);
          gr.A[r * N + n] += lane_sum(gA[n]);
        }
        for (int64_t k = 0; k < K; k++) gr.conv_w[r * K + k] += lane_sum(gcw[k]);
        gr.conv_b[r] += lane_sum(gcb);
        gr.delta_w[r] += lane_sum(gdw);
        gr.D[r] += lane_sum(gD);
      }
      store_tile(dv, t0, T, E, dvbuf);
      if (z) {  /* dz = dout * (y_0 + y_1) * silu'(z) */
        float (*dzbuf)[LANES] = xs;  /* reuse */
        for (int j = 0; j < LANES; j++) {
          int64_t t = t0 + j < T ? t0 + j : T - 1;
          for (int64_t c = 0; c < E; c++) dzbuf[c][j] = dout[t * sd_t + c * sd_e];
        }
        for (int64_t c = 0; c < E; c++)
          for (int j = 0; j < LANES; j++) {
            float zz = zbuf[c][j], sg = sigmoid_vec(zz);
            dzbuf[c][j] *= ybuf[c][j] * sg * (1.0f + zz * (1.0f - sg));
          }
        store_tile(dz, t0, T, E, dzbuf);
      }
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
