/* Selective scan (Mamba S6) forward and backward for CPUs, float32.
 *
 * Compiled on first use by cpu_backend.py with the machine's C compiler (-O3 -march=native, OpenMP
 * when available) and called through ctypes; there is no Python C-API code here.
 *
 * Work decomposition: "rows" are the flattened (batch, dim) pairs in the order r = b * dim + d. One
 * tile = LANES consecutive rows, walked through the whole sequence in scan order with the state
 * h[N][LANES] in float32 registers/L1; the inner loops run over the lanes, so the compiler vectorises
 * them (LANES = 32: two AVX-512 registers). When all rows of a tile share one (batch, group), B/C are
 * loaded once per step and broadcast; otherwise each lane gathers its own (e.g. dim = 1).
 *
 * Numerics: the exponential is evaluated only on clamped arguments by exp_vec (Cody-Waite range
 * reduction + degree-7 polynomial, relative error ~2e-7), written so that it vectorises without
 * -ffast-math (which would set flush-to-zero for the whole process on some toolchains).
 *
 * The state entering every chunk of CHUNK steps (scan order) is written to `saved`
 * (rows, n_chunks, N); backward recomputes one chunk's states from there into a small buffer and walks
 * the chunk in reverse, so neither pass stores a (rows, L, N) tensor.
 *
 * Sequences may be two-level: scan position t (natural order) lives at (t / L2, t % L2) with strides
 * (s1, s2); every tensor is addressed through element strides, so token-major and column-major views
 * need no copies. All offsets are int64.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include "simd_math.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_STATE 64  /* largest N (d_state); checked by cpu_backend.py */

#define PREFETCH_AHEAD 8
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)0)
#endif

/* ---- shape / flag vector (mirrors cpu_backend.py) ---- */
enum { S_BATCH, S_DIM, S_GROUPS, S_L1, S_L2, S_N, S_CHUNK, S_THREADS, S_SOFTPLUS, S_REVERSE, S_BC_STEP_MAJOR,
       S_COUNT };
/* sequence strides: b, d, s1, s2;  B/C strides: b, g, n, s1, s2 */
enum { Q_B, Q_D, Q_1, Q_2 };
enum { P_B, P_G, P_N, P_1, P_2 };

typedef struct {
  int64_t batch, dim, groups, per_group, L1, L2, L, N, chunk, n_chunks, rows;
  int softplus, reverse;
  int64_t bc_t, bc_n;  /* strides of step t and state n in the dB/dC partials */
} Geometry;

static Geometry geometry(const int64_t *shape) {
  Geometry g;
  g.batch = shape[S_BATCH];
  g.dim = shape[S_DIM];
  g.groups = shape[S_GROUPS];
  g.per_group = g.dim / g.groups;
  g.L1 = shape[S_L1];
  g.L2 = shape[S_L2];
  g.L = g.L1 * g.L2;
  g.N = shape[S_N];
  g.chunk = shape[S_CHUNK];
  g.n_chunks = (g.L + g.chunk - 1) / g.chunk;
  g.rows = g.batch * g.dim;
  g.softplus = (int)shape[S_SOFTPLUS];
  g.reverse = (int)shape[S_REVERSE];
  /* (.., L, N) when every tile broadcasts B/C (one cache line per step), else (.., N, L) like B itself */
  g.bc_t = shape[S_BC_STEP_MAJOR] ? g.N : 1;
  g.bc_n = shape[S_BC_STEP_MAJOR] ? 1 : g.L;
  return g;
}

/* Per-tile lane bookkeeping: row index, validity and base offsets of every tensor. */
typedef struct {
  int64_t row[LANES], d[LANES];
  int valid[LANES];
  int shared;      /* all lanes in one (batch, group): B/C broadcast */
  int same_batch;  /* all lanes in one batch element: lane j at base + j * (dim stride) */
  int64_t bc_b[LANES], bc_g[LANES];
} Tile;

static void make_tile(const Geometry *g, int64_t tile, Tile *tl) {
  int64_t first = tile * LANES;
  int64_t last_row = first + LANES - 1 < g->rows ? first + LANES - 1 : g->rows - 1;
  for (int j = 0; j < LANES; j++) {
    int64_t r = first + j;
    tl->valid[j] = r < g->rows;
    r = r < g->rows ? r : last_row;  /* padded lanes repeat the last row; never stored */
    tl->row[j] = r;
    tl->d[j] = r % g->dim;
    tl->bc_b[j] = r / g->dim;
    tl->bc_g[j] = tl->d[j] / g->per_group;
  }
  tl->same_batch = tl->bc_b[0] == tl->bc_b[LANES - 1] && first + LANES <= g->rows;
  tl->shared = tl->bc_b[0] == tl->bc_b[LANES - 1] && tl->bc_g[0] == tl->bc_g[LANES - 1];
}

static inline int64_t seq_base(const int64_t *st, const Tile *tl, int j) {
  return tl->bc_b[j] * st[Q_B] + tl->d[j] * st[Q_D];
}

static inline int64_t seq_step(const int64_t *st, int64_t t1, int64_t t2) { return t1 * st[Q_1] + t2 * st[Q_2]; }

/* x[j] = p[base[j] + toff]; contiguous vector loads when the lanes are consecutive channels. */
static inline void load_lanes(const float *p, const int64_t *base, int64_t toff, int64_t lane_stride,
                              int same_batch, float *x) {
  if (same_batch) {
    const float *q = p + base[0] + toff;
    if (lane_stride == 1)
      for (int j = 0; j < LANES; j++) x[j] = q[j];
    else
      for (int j = 0; j < LANES; j++) x[j] = q[j * lane_stride];
  } else {
    for (int j = 0; j < LANES; j++) x[j] = p[base[j] + toff];
  }
}

/* p[base[j] + toff] = x[j] for the valid lanes (same_batch implies all lanes are valid). */
static inline void store_lanes(float *p, const int64_t *base, int64_t toff, int64_t lane_stride,
                               const Tile *tl, const float *x) {
  if (tl->same_batch) {
    float *q = p + base[0] + toff;
    if (lane_stride == 1)
      for (int j = 0; j < LANES; j++) q[j] = x[j];
    else
      for (int j = 0; j < LANES; j++) q[j * lane_stride] = x[j];
  } else {
    for (int j = 0; j < LANES; j++)
      if (tl->valid[j]) p[base[j] + toff] = x[j];
  }
}

/* Prefetches the step (p1, p2) inputs of a tile's first lane (the others share its cache lines when
   the lanes are consecutive channels). */
static inline void prefetch_step(const float *u, const int64_t *su, int64_t bu, const float *delta,
                                 const int64_t *sdl, int64_t bd, const float *Bm, const int64_t *sB, int64_t bb,
                                 const float *Cm, const int64_t *sC, int64_t bc, const float *z,
                                 const int64_t *sz, int64_t bz, int64_t p1, int64_t p2) {
  PREFETCH(u + bu + seq_step(su, p1, p2));
  PREFETCH(delta + bd + seq_step(sdl, p1, p2));
  PREFETCH(Bm + bb + p1 * sB[P_1] + p2 * sB[P_2]);
  PREFETCH(Cm + bc + p1 * sC[P_1] + p2 * sC[P_2]);
  if (z) PREFETCH(z + bz + seq_step(sz, p1, p2));
}

static inline int64_t bc_base(const int64_t *st, const Tile *tl, int j) {
  return tl->bc_b[j] * st[P_B] + tl->bc_g[j] * st[P_G];
}

/* Loads B or C of step (t1, t2) for every lane: out[n][j]. */
static inline void load_bc(const Geometry *g, const Tile *tl, const float *M, const int64_t *st,
                           const int64_t *base, int64_t t1, int64_t t2, float out[][LANES]) {
  int64_t toff = t1 * st[P_1] + t2 * st[P_2];
  if (tl->shared) {
    for (int64_t n = 0; n < g->N; n++) {
      float v = M[base[0] + n * st[P_N] + toff];
      for (int j = 0; j < LANES; j++) out[n][j] = v;
    }
  } else {
    for (int64_t n = 0; n < g->N; n++)
      for (int j = 0; j < LANES; j++) out[n][j] = M[base[j] + n * st[P_N] + toff];
  }
}

static inline int64_t scan_time(const Geometry *g, int64_t s) { return g->reverse ? g->L - 1 - s : s; }

/* (t1, t2) of scan step s; moving to step s + dir (dir = +1 or -1) without a division per step */
static inline void cursor_set(const Geometry *g, int64_t s, int64_t *t1, int64_t *t2) {
  int64_t t = scan_time(g, s);
  *t1 = t / g->L2;
  *t2 = t % g->L2;
}

static inline void cursor_move(const Geometry *g, int dir, int64_t *t1, int64_t *t2) {
  if ((dir > 0) != (g->reverse != 0)) {
    if (++*t2 == g->L2) { *t2 = 0; ++*t1; }
  } else {
    if (--*t2 < 0) { *t2 = g->L2 - 1; --*t1; }
  }
}

static int thread_count(const int64_t *shape) {
  int n = (int)shape[S_THREADS];
  return n < 1 ? 1 : n;
}

/* --------------------------------------------------------------------------------------------- */
/* forward                                                                                         */
/* --------------------------------------------------------------------------------------------- */

int vim2_scan_fwd(const int64_t *shape,
                  const float *u, const int64_t *su, const float *delta, const int64_t *sdl,
                  const float *A, const float *Bm, const int64_t *sB, const float *Cm, const int64_t *sC,
                  const float *Dv, const float *z, const int64_t *sz, const float *bias, const float *init,
                  float *out, const int64_t *so, float *last, float *saved) {
  const Geometry g = geometry(shape);
  if (g.N > MAX_STATE) return 3;
  const int64_t n_tiles = (g.rows + LANES - 1) / LANES;
  const int nthreads = thread_count(shape);
  int failed = 0;
  (void)nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t tile = 0; tile < n_tiles; tile++) {
    Tile tl;
    make_tile(&g, tile, &tl);
    /* fixed-size arrays: the compiler then knows they do not alias (N <= MAX_STATE, checked) */
    float h[MAX_STATE][LANES], a[MAX_STATE][LANES], bv[MAX_STATE][LANES], cv[MAX_STATE][LANES];
    float dskip[LANES], dbias[LANES];
    int64_t bu[LANES], bd[LANES], bz[LANES], bo[LANES], bb[LANES], bc[LANES];
    for (int j = 0; j < LANES; j++) {
      bu[j] = seq_base(su, &tl, j);
      bd[j] = seq_base(sdl, &tl, j);
      bz[j] = z ? seq_base(sz, &tl, j) : 0;
      bo[j] = seq_base(so, &tl, j);
      bb[j] = bc_base(sB, &tl, j);
      bc[j] = bc_base(sC, &tl, j);
      dskip[j] = Dv ? Dv[tl.d[j]] : 0.0f;
      dbias[j] = bias ? bias[tl.d[j]] : 0.0f;
      for (int64_t n = 0; n < g.N; n++) {
        a[n][j] = A[tl.d[j] * g.N + n];
        h[n][j] = init ? init[tl.row[j] * g.N + n] : 0.0f;
        if (is_nan_bits(a[n][j])) h[n][j] = a[n][j];  /* a NaN in A reaches the output (exp clamps would not) */
      }
    }
    int64_t t1, t2, p1, p2;  /* this step, and the step PREFETCH_AHEAD later */
    cursor_set(&g, 0, &t1, &t2);
    cursor_set(&g, PREFETCH_AHEAD < g.L ? PREFETCH_AHEAD : g.L - 1, &p1, &p2);
    for (int64_t s = 0, c = 0, to_save = 0; s < g.L; s++, to_save--, cursor_move(&g, 1, &t1, &t2)) {
      if (s + PREFETCH_AHEAD < g.L) {
        /* routes over 2-D maps jump by a whole row or column per step: too far for the hardware prefetcher */
        prefetch_step(u, su, bu[0], delta, sdl, bd[0], Bm, sB, bb[0], Cm, sC, bc[0], z, sz, bz[0], p1, p2);
        cursor_move(&g, 1, &p1, &p2);
      }
      if (to_save == 0) {  /* the state entering chunk c */
        to_save = g.chunk;
        for (int j = 0; j < LANES; j++)
          if (tl.valid[j])
            for (int64_t n = 0; n < g.N; n++) saved[(tl.row[j] * g.n_chunks + c) * g.N + n] = h[n][j];
        c++;
      }
      float x[LANES], v[LANES], dt[LANES], dtx[LANES], y[LANES];
      load_lanes(u, bu, seq_step(su, t1, t2), su[Q_D], tl.same_batch, x);
      load_lanes(delta, bd, seq_step(sdl, t1, t2), sdl[Q_D], tl.same_batch, v);
      for (int j = 0; j < LANES; j++) v[j] += dbias[j];
      step_sizes(g.softplus, v, dt);
      for (int j = 0; j < LANES; j++) {
        dtx[j] = dt[j] * x[j];
        y[j] = dskip[j] * x[j];
      }
      if (tl.shared) {  /* one B/C value per step, broadcast over the lanes */
        const int64_t ob = bb[0] + t1 * sB[P_1] + t2 * sB[P_2], oc = bc[0] + t1 * sC[P_1] + t2 * sC[P_2];
        /* four partial sums: one running sum over n would be a serial dependency chain */
        float yp[4][LANES] = {{0.0f}};
        for (int64_t n = 0; n < g.N; n++) {
          const float bn = Bm[ob + n * sB[P_N]], cn = Cm[oc + n * sC[P_N]];
          for (int j = 0; j < LANES; j++) {
            float hn = exp_vec(dt[j] * a[n][j]) * h[n][j] + dtx[j] * bn;
            h[n][j] = hn;
            yp[n & 3][j] += hn * cn;
          }
        }
        for (int j = 0; j < LANES; j++) y[j] += (yp[0][j] + yp[1][j]) + (yp[2][j] + yp[3][j]);
      } else {
        load_bc(&g, &tl, Bm, sB, bb, t1, t2, bv);
        load_bc(&g, &tl, Cm, sC, bc, t1, t2, cv);
        for (int64_t n = 0; n < g.N; n++)
          for (int j = 0; j < LANES; j++) {
            float hn = exp_vec(dt[j] * a[n][j]) * h[n][j] + dtx[j] * bv[n][j];
            h[n][j] = hn;
            y[j] += hn * cv[n][j];
          }
      }
      if (z) {
        float zz[LANES];
        load_lanes(z, bz, seq_step(sz, t1, t2), sz[Q_D], tl.same_batch, zz);
        for (int j = 0; j < LANES; j++) y[j] *= zz[j] * sigmoid_vec(zz[j]);
      }
      store_lanes(out, bo, seq_step(so, t1, t2), so[Q_D], &tl, y);
    }
    for (int j = 0; j < LANES; j++)
      if (tl.valid[j])
        for (int64_t n = 0; n < g.N; n++) last[tl.row[j] * g.N + n] = h[n][j];
  }
  return failed ? 2 : 0;
}

/* --------------------------------------------------------------------------------------------- */
/* backward                                                                                        */
/* --------------------------------------------------------------------------------------------- */

/* Gradients. Per-row outputs (contiguous): dA_rows (rows, N), dD_rows (rows), dbias_rows (rows),
 * dinit (rows, N). dB/dC: per-thread partials (threads, batch, groups, L, N) in natural order t when
 * S_BC_STEP_MAJOR (N innermost: one step's N values share a cache line), else (threads, batch, groups,
 * N, L);
 * summed by the caller. du/ddelta/dz are addressed through strides like the inputs. */
int vim2_scan_bwd(const int64_t *shape,
                  const float *u, const int64_t *su, const float *delta, const int64_t *sdl,
                  const float *A, const float *Bm, const int64_t *sB, const float *Cm, const int64_t *sC,
                  const float *Dv, const float *z, const int64_t *sz, const float *bias,
                  const float *saved, const float *dout, const int64_t *sdo, const float *dlast,
                  float *du, const int64_t *sdu, float *ddelta, const int64_t *sddl, float *dz, const int64_t *sdz,
                  float *dA_rows, float *dB, float *dC, float *dD_rows, float *dbias_rows, float *dinit) {
  const Geometry g = geometry(shape);
  if (g.N > MAX_STATE) return 3;
  const int64_t n_tiles = (g.rows + LANES - 1) / LANES;
  const int nthreads = thread_count(shape);
  const int64_t bc_numel = g.batch * g.groups * g.N * g.L;
  int failed = 0;
  (void)nthreads;
  /* static schedule: each tile always lands on the same thread, so the per-thread dB/dC partials, hence
     the gradients, are bitwise reproducible for a given thread count */
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t tile = 0; tile < n_tiles; tile++) {
#ifdef _OPENMP
    const int64_t thread = omp_get_thread_num();
#else
    const int64_t thread = 0;
#endif
    float *dB_t = dB + thread * bc_numel, *dC_t = dC + thread * bc_numel;
    Tile tl;
    make_tile(&g, tile, &tl);
    /* states after every step of the chunk (heap: chunk * N * LANES floats), and the state entering it */
    /* heap: the chunk's states and decays (2 * chunk * MAX_STATE * LANES floats); the rest is fixed-size
       so that the compiler knows nothing aliases */
    float *scratch = malloc(sizeof(float) * (size_t)(2 * g.chunk * MAX_STATE * LANES));
    if (!scratch) { failed = 1; continue; }
    float (*hs)[MAX_STATE][LANES] = (float (*)[MAX_STATE][LANES])scratch;
    float (*decays)[MAX_STATE][LANES] = hs + g.chunk;
    float h0[MAX_STATE][LANES], a[MAX_STATE][LANES], G[MAX_STATE][LANES], dAacc[MAX_STATE][LANES];
    float bv[MAX_STATE][LANES], cv[MAX_STATE][LANES];
    float dskip[LANES], dbias[LANES], dDacc[LANES], dbacc[LANES], vmask[LANES];
    int64_t bu[LANES], bd[LANES], bz[LANES], bdo[LANES], bdu[LANES], bdd[LANES], bdz[LANES], bb[LANES], bc[LANES];
    int64_t bcg[LANES];  /* offset of the lane's (batch, group) in the dB/dC partials */
    for (int j = 0; j < LANES; j++) {
      bu[j] = seq_base(su, &tl, j);
      bd[j] = seq_base(sdl, &tl, j);
      bz[j] = z ? seq_base(sz, &tl, j) : 0;
      bdz[j] = z ? seq_base(sdz, &tl, j) : 0;
      bdo[j] = seq_base(sdo, &tl, j);
      bdu[j] = seq_base(sdu, &tl, j);
      bdd[j] = seq_base(sddl, &tl, j);
      bb[j] = bc_base(sB, &tl, j);
      bc[j] = bc_base(sC, &tl, j);
      bcg[j] = (tl.bc_b[j] * g.groups + tl.bc_g[j]) * g.N * g.L;
      dskip[j] = Dv ? Dv[tl.d[j]] : 0.0f;
      dbias[j] = bias ? bias[tl.d[j]] : 0.0f;
      dDacc[j] = 0.0f;
      dbacc[j] = 0.0f;
      vmask[j] = tl.valid[j] ? 1.0f : 0.0f;
      for (int64_t n = 0; n < g.N; n++) {
        a[n][j] = A[tl.d[j] * g.N + n];
        G[n][j] = dlast ? dlast[tl.row[j] * g.N + n] : 0.0f;
        dAacc[n][j] = 0.0f;
      }
    }
    for (int64_t c = g.n_chunks - 1; c >= 0; c--) {
      int64_t s0 = c * g.chunk, s1 = s0 + g.chunk < g.L ? s0 + g.chunk : g.L;
      /* recompute the chunk's states */
      for (int j = 0; j < LANES; j++)
        for (int64_t n = 0; n < g.N; n++) h0[n][j] = saved[(tl.row[j] * g.n_chunks + c) * g.N + n];
      int64_t t1, t2, p1, p2;
      cursor_set(&g, s0, &t1, &t2);
      cursor_set(&g, s0 + PREFETCH_AHEAD < s1 ? s0 + PREFETCH_AHEAD : s1 - 1, &p1, &p2);
      for (int64_t s = s0; s < s1; s++, cursor_move(&g, 1, &t1, &t2)) {
        if (s + PREFETCH_AHEAD < s1) {  /* the reverse walk below then finds the chunk in cache */
          prefetch_step(u, su, bu[0], delta, sdl, bd[0], Bm, sB, bb[0], Cm, sC, bc[0], z, sz, bz[0], p1, p2);
          PREFETCH(dout + bdo[0] + seq_step(sdo, p1, p2));
          cursor_move(&g, 1, &p1, &p2);
        }
        float x[LANES], v[LANES], dt[LANES], dtx[LANES];
        load_lanes(u, bu, seq_step(su, t1, t2), su[Q_D], tl.same_batch, x);
        load_lanes(delta, bd, seq_step(sdl, t1, t2), sdl[Q_D], tl.same_batch, v);
        for (int j = 0; j < LANES; j++) v[j] += dbias[j];
        step_sizes(g.softplus, v, dt);
        for (int j = 0; j < LANES; j++) dtx[j] = dt[j] * x[j];
        float (*prev)[LANES] = s == s0 ? h0 : hs[s - s0 - 1];
        float (*hk)[LANES] = hs[s - s0], (*ek)[LANES] = decays[s - s0];
        if (tl.shared) {
          const int64_t ob = bb[0] + t1 * sB[P_1] + t2 * sB[P_2];
          for (int64_t n = 0; n < g.N; n++) {
            const float bn = Bm[ob + n * sB[P_N]];
            for (int j = 0; j < LANES; j++) {
              float e = exp_vec(dt[j] * a[n][j]);
              ek[n][j] = e;
              hk[n][j] = e * prev[n][j] + dtx[j] * bn;
            }
          }
        } else {
          load_bc(&g, &tl, Bm, sB, bb, t1, t2, bv);
          for (int64_t n = 0; n < g.N; n++)
            for (int j = 0; j < LANES; j++) {
              float e = exp_vec(dt[j] * a[n][j]);
              ek[n][j] = e;
              hk[n][j] = e * prev[n][j] + dtx[j] * bv[n][j];
            }
        }
      }
      /* walk the chunk backwards */
      cursor_set(&g, s1 - 1, &t1, &t2);
      for (int64_t s = s1 - 1; s >= s0; s--, cursor_move(&g, -1, &t1, &t2)) {
        const int64_t t = t1 * g.L2 + t2;
        float x[LANES], v[LANES], dt[LANES], gy[LANES], ddt[LANES], dx[LANES];
        load_bc(&g, &tl, Cm, sC, bc, t1, t2, cv);  /* (also for the dz recompute below) */
        if (!tl.shared) load_bc(&g, &tl, Bm, sB, bb, t1, t2, bv);
        float (*h)[LANES] = hs[s - s0], (*ek)[LANES] = decays[s - s0];
        float (*prev)[LANES] = s == s0 ? h0 : hs[s - s0 - 1];
        load_lanes(u, bu, seq_step(su, t1, t2), su[Q_D], tl.same_batch, x);
        load_lanes(delta, bd, seq_step(sdl, t1, t2), sdl[Q_D], tl.same_batch, v);
        load_lanes(dout, bdo, seq_step(sdo, t1, t2), sdo[Q_D], tl.same_batch, gy);
        for (int j = 0; j < LANES; j++) v[j] += dbias[j];
        step_sizes(g.softplus, v, dt);
        if (z) {  /* recompute the ungated output y for dz */
          float y[LANES], zz[LANES], dzv[LANES];
          for (int j = 0; j < LANES; j++) y[j] = dskip[j] * x[j];
          for (int64_t n = 0; n < g.N; n++)
            for (int j = 0; j < LANES; j++) y[j] += h[n][j] * cv[n][j];
          load_lanes(z, bz, seq_step(sz, t1, t2), sz[Q_D], tl.same_batch, zz);
          for (int j = 0; j < LANES; j++) {
            float sg = sigmoid_vec(zz[j]);
            dzv[j] = gy[j] * y[j] * sg * (1.0f + zz[j] * (1.0f - sg));
            gy[j] *= zz[j] * sg;
          }
          store_lanes(dz, bdz, seq_step(sdz, t1, t2), sdz[Q_D], &tl, dzv);
        }
        for (int j = 0; j < LANES; j++) {
          dx[j] = dskip[j] * gy[j];
          dDacc[j] += gy[j] * x[j];
        }
        /* G_t = gy C_t + (carry in G); dC_t[n] = sum over lanes of gy h_t[n], dB_t[n] of G dt x.
           ddt and dx are summed in two interleaved partials (one running sum would be a serial chain). */
        float ddt2[2][LANES] = {{0.0f}}, dx2[2][LANES] = {{0.0f}};
        float dBs[MAX_STATE][LANES], dCs[MAX_STATE][LANES];  /* per-lane dB/dC of this step (gather tiles) */
        for (int64_t n = 0; n < g.N; n++) {
          float dcn[LANES], dbn[LANES];
          const int64_t toff = t * g.bc_t + n * g.bc_n;
          if (tl.shared) {
            const float bn = Bm[bb[0] + n * sB[P_N] + t1 * sB[P_1] + t2 * sB[P_2]];
            const float cn = Cm[bc[0] + n * sC[P_N] + t1 * sC[P_1] + t2 * sC[P_2]];
            for (int j = 0; j < LANES; j++) {
              float Gn = G[n][j] + gy[j] * cn, decay = ek[n][j], hp = prev[n][j];
              dcn[j] = gy[j] * h[n][j];
              dbn[j] = Gn * dt[j] * x[j];
              ddt2[n & 1][j] += Gn * (bn * x[j] + a[n][j] * decay * hp);
              dx2[n & 1][j] += Gn * dt[j] * bn;
              dAacc[n][j] += Gn * dt[j] * decay * hp;
              G[n][j] = Gn * decay;  /* carry to the previous step */
            }
            /* a shared tile has all its lanes valid (rows of one (batch, group), aligned) unless it is
               the last tile: mask the padded lanes there */
            if (!tl.same_batch)
              for (int j = 0; j < LANES; j++) { dcn[j] *= vmask[j]; dbn[j] *= vmask[j]; }
            dC_t[bcg[0] + toff] += lane_sum(dcn);
            dB_t[bcg[0] + toff] += lane_sum(dbn);
          } else {
            for (int j = 0; j < LANES; j++) {
              float Gn = G[n][j] + gy[j] * cv[n][j], decay = ek[n][j], hp = prev[n][j];
              dCs[n][j] = gy[j] * h[n][j];
              dBs[n][j] = Gn * dt[j] * x[j];
              ddt2[n & 1][j] += Gn * (bv[n][j] * x[j] + a[n][j] * decay * hp);
              dx2[n & 1][j] += Gn * dt[j] * bv[n][j];
              dAacc[n][j] += Gn * dt[j] * decay * hp;
              G[n][j] = Gn * decay;
            }
          }
        }
        if (!tl.shared)  /* per lane: its (batch, group) slot of the partials */
          for (int j = 0; j < LANES; j++) {
            if (!tl.valid[j]) continue;
            float *pc = dC_t + bcg[j] + t * g.bc_t, *pb = dB_t + bcg[j] + t * g.bc_t;
            for (int64_t n = 0; n < g.N; n++) {
              pc[n * g.bc_n] += dCs[n][j];
              pb[n * g.bc_n] += dBs[n][j];
            }
          }
        for (int j = 0; j < LANES; j++) {
          ddt[j] = ddt2[0][j] + ddt2[1][j];
          dx[j] += dx2[0][j] + dx2[1][j];
        }
        float dv[LANES];
        if (g.softplus)
          for (int j = 0; j < LANES; j++) {
            float sg = sigmoid_vec(v[j]);
            dv[j] = ddt[j] * (v[j] > 20.0f ? 1.0f : sg);
          }
        else
          for (int j = 0; j < LANES; j++) dv[j] = ddt[j];
        for (int j = 0; j < LANES; j++) dbacc[j] += dv[j];
        store_lanes(du, bdu, seq_step(sdu, t1, t2), sdu[Q_D], &tl, dx);
        store_lanes(ddelta, bdd, seq_step(sddl, t1, t2), sddl[Q_D], &tl, dv);
      }
    }
    for (int j = 0; j < LANES; j++) {
      if (!tl.valid[j]) continue;
      int64_t r = tl.row[j];
      for (int64_t n = 0; n < g.N; n++) {
        dA_rows[r * g.N + n] = dAacc[n][j];
        if (dinit) dinit[r * g.N + n] = G[n][j];
      }
      if (dD_rows) dD_rows[r] = dDacc[j];
      if (dbias_rows) dbias_rows[r] = dbacc[j];
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
