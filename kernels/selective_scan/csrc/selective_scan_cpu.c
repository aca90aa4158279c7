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
 * Numerics: the decays exp(dt * a) are 2^(dt * a * log2(e)) by exp2_lanes (AVX-512: floor reduction +
 * degree-5 polynomial + vscalefps; elsewhere the same polynomial with a float-shifter reduction, clamped), the
 * softplus by exp_vec/log_vec; all written so that they vectorise without -ffast-math (which would set
 * flush-to-zero for the whole process on some toolchains). Relative error of each ~1e-7.
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
#define MAX_DT_RANK 64  /* largest rank of a low-rank step-size input (forward); checked by cpu_backend.py */

#define PREFETCH_AHEAD 8
#define WALK_PREFETCH 4  /* backward's reverse walk: steps ahead (4 and 8 measured alike) */
#define STEP_BLOCK 16  /* forward: steps whose element-wise prologue runs ahead of their recurrence */
#define TILE_GROUP 8   /* forward: tiles walked together through each block of steps */
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)0)
#endif

/* ---- shape / flag vector (mirrors cpu_backend.py) ---- */
enum { S_BATCH, S_DIM, S_GROUPS, S_L1, S_L2, S_N, S_CHUNK, S_THREADS, S_SOFTPLUS, S_REVERSE, S_BC_STEP_MAJOR,
       S_DT_RANK, S_ACCUMULATE, S_COUNT };
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

/* Prefetches a tile's row of a sequence tensor at step (p1, p2): the first and the last lane, i.e. both
   cache lines of 32 consecutive channels (the adjacent-line prefetcher does not follow column routes). */
static inline void prefetch_lanes(const float *p, const int64_t *st, int64_t base, int64_t p1, int64_t p2) {
  const float *q = p + base + seq_step(st, p1, p2);
  PREFETCH(q);
  PREFETCH(q + (LANES - 1) * st[Q_D]);
}

/* Prefetches the step (p1, p2) inputs of a tile (lane 0's B/C: shared by the tile when it broadcasts). */
static inline void prefetch_step(const float *u, const int64_t *su, int64_t bu, const float *delta,
                                 const int64_t *sdl, int64_t bd, const float *Bm, const int64_t *sB, int64_t bb,
                                 const float *Cm, const int64_t *sC, int64_t bc, const float *z,
                                 const int64_t *sz, int64_t bz, int64_t p1, int64_t p2) {
  prefetch_lanes(u, su, bu, p1, p2);
  if (delta) prefetch_lanes(delta, sdl, bd, p1, p2);
  PREFETCH(Bm + bb + p1 * sB[P_1] + p2 * sB[P_2]);
  PREFETCH(Cm + bc + p1 * sC[P_1] + p2 * sC[P_2]);
  if (z) prefetch_lanes(z, sz, bz, p1, p2);
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

/* One tile's constants in the forward: lane bookkeeping, base offsets, per-channel parameters. */
typedef struct {
  Tile tl;
  int64_t bu[LANES], bd[LANES], bz[LANES], bo[LANES], bb[LANES], bc[LANES], br[LANES];
  float dskip[LANES], dbias[LANES];
} FwdTile;

typedef struct {  /* the forward's arguments */
  const float *u, *delta, *A, *Bm, *Cm, *Dv, *z, *bias, *init, *dts, *dt_w;
  const int64_t *su, *sdl, *sB, *sC, *sz, *so, *sdr;
  float *out, *last, *saved;
  int64_t rank;
  int accumulate;
} FwdArgs;

/* Per-tile setup: offsets, D, Δ bias, a * log2(e), the low-rank Δ weights and the initial state. */
static void fwd_tile_setup(const Geometry *g, const FwdArgs *f, int64_t tile, FwdTile *ft, float *h, float *a2,
                           float *w) {
  Tile *tl = &ft->tl;
  make_tile(g, tile, tl);
  for (int j = 0; j < LANES; j++) {
    ft->bu[j] = seq_base(f->su, tl, j);
    ft->bd[j] = f->rank ? 0 : seq_base(f->sdl, tl, j);
    ft->br[j] = f->rank ? tl->bc_b[j] * f->sdr[P_B] : 0;
    ft->bz[j] = f->z ? seq_base(f->sz, tl, j) : 0;
    ft->bo[j] = seq_base(f->so, tl, j);
    ft->bb[j] = bc_base(f->sB, tl, j);
    ft->bc[j] = bc_base(f->sC, tl, j);
    ft->dskip[j] = f->Dv ? f->Dv[tl->d[j]] : 0.0f;
    ft->dbias[j] = f->bias ? f->bias[tl->d[j]] : 0.0f;
    for (int64_t r = 0; r < f->rank; r++) w[r * LANES + j] = f->dt_w[tl->d[j] * f->rank + r];
    for (int64_t n = 0; n < g->N; n++) {
      const float an = f->A[tl->d[j] * g->N + n];
      a2[n * LANES + j] = an * LOG2E_F;  /* decay exp(dt * a) = 2^(dt * a2) */
      h[n * LANES + j] = f->init ? f->init[tl->row[j] * g->N + n] : 0.0f;
      if (is_nan_bits(an)) h[n * LANES + j] = an;  /* a NaN in A reaches the output (exp clamps would not) */
    }
  }
}

/* Steps [s0, s0 + nb) of one tile: element-wise prologue, recurrence, gate/store epilogue.
 * The prologue's steps are independent, so the out-of-order core overlaps them; inside the recurrence
 * each step's softplus latency would otherwise stall all N state updates behind it. */
static void fwd_tile_block(const Geometry *g, const FwdArgs *f, const FwdTile *ft, float *h, const float *a2,
                           const float *w, int64_t s0, int64_t nb, int64_t save_at) {
  const Tile *tl = &ft->tl;
  float dtb[STEP_BLOCK][LANES], dtxb[STEP_BLOCK][LANES], yb[STEP_BLOCK][LANES];
  int64_t tb1[STEP_BLOCK], tb2[STEP_BLOCK];
  int64_t t1, t2, p1, p2;  /* the step to load, and the step PREFETCH_AHEAD later */
  cursor_set(g, s0, &t1, &t2);
  cursor_set(g, s0 + PREFETCH_AHEAD < g->L ? s0 + PREFETCH_AHEAD : g->L - 1, &p1, &p2);
  for (int64_t i = 0; i < nb; i++, cursor_move(g, 1, &t1, &t2)) {
    if (s0 + i + PREFETCH_AHEAD < g->L) {
      /* routes over 2-D maps jump by a whole row or column per step: too far for the hardware prefetcher */
      prefetch_step(f->u, f->su, ft->bu[0], f->rank ? NULL : f->delta, f->sdl, ft->bd[0], f->Bm, f->sB, ft->bb[0],
                    f->Cm, f->sC, ft->bc[0], f->z, f->sz, ft->bz[0], p1, p2);
      if (f->rank) PREFETCH(f->dts + ft->br[0] + p1 * f->sdr[P_1] + p2 * f->sdr[P_2]);
      if (f->accumulate) prefetch_lanes(f->out, f->so, ft->bo[0], p1, p2);
      cursor_move(g, 1, &p1, &p2);
    }
    tb1[i] = t1;
    tb2[i] = t2;
    float x[LANES], v[LANES];
    load_lanes(f->u, ft->bu, seq_step(f->su, t1, t2), f->su[Q_D], tl->same_batch, x);
    if (f->rank) {  /* v = dts . w: the low-rank step-size input */
      const int64_t toff = t1 * f->sdr[P_1] + t2 * f->sdr[P_2];
      for (int j = 0; j < LANES; j++) v[j] = ft->dbias[j];
      for (int64_t r = 0; r < f->rank; r++) {
        const float *wr = w + r * LANES;
        if (tl->same_batch) {
          const float dr = f->dts[ft->br[0] + r * f->sdr[P_N] + toff];
          for (int j = 0; j < LANES; j++) v[j] += dr * wr[j];
        } else {
          for (int j = 0; j < LANES; j++) v[j] += f->dts[ft->br[j] + r * f->sdr[P_N] + toff] * wr[j];
        }
      }
    } else {
      load_lanes(f->delta, ft->bd, seq_step(f->sdl, t1, t2), f->sdl[Q_D], tl->same_batch, v);
      for (int j = 0; j < LANES; j++) v[j] += ft->dbias[j];
    }
    step_sizes(g->softplus, v, dtb[i]);
    for (int j = 0; j < LANES; j++) {
      dtxb[i][j] = dtb[i][j] * x[j];
      yb[i][j] = ft->dskip[j] * x[j];
    }
  }
  float bv[MAX_STATE][LANES], cv[MAX_STATE][LANES];
  for (int64_t i = 0; i < nb; i++) {
    const int64_t s = s0 + i;
    if (s == save_at && f->saved) {  /* the state entering chunk s / chunk (no backward: saved = NULL) */
      save_at += g->chunk;
      const int64_t c = s / g->chunk;
      for (int j = 0; j < LANES; j++)
        if (tl->valid[j])
          for (int64_t n = 0; n < g->N; n++) f->saved[(tl->row[j] * g->n_chunks + c) * g->N + n] = h[n * LANES + j];
    }
    const float *dt = dtb[i], *dtx = dtxb[i];
    float *y = yb[i];
    if (tl->shared) {  /* one B/C value per step, broadcast over the lanes */
      const int64_t ob = ft->bb[0] + tb1[i] * f->sB[P_1] + tb2[i] * f->sB[P_2];
      const int64_t oc = ft->bc[0] + tb1[i] * f->sC[P_1] + tb2[i] * f->sC[P_2];
      /* four partial sums: one running sum over n would be a serial dependency chain */
      float yp[4][LANES] = {{0.0f}};
      for (int64_t n = 0; n < g->N; n++) {
        const float bn = f->Bm[ob + n * f->sB[P_N]], cn = f->Cm[oc + n * f->sC[P_N]];
        float *hn_ = h + n * LANES;
        float e[LANES];
        decay_lanes(dt, a2 + n * LANES, e);
        for (int j = 0; j < LANES; j++) {
          float hn = e[j] * hn_[j] + dtx[j] * bn;
          hn_[j] = hn;
          yp[n & 3][j] += hn * cn;
        }
      }
      for (int j = 0; j < LANES; j++) y[j] += (yp[0][j] + yp[1][j]) + (yp[2][j] + yp[3][j]);
    } else {
      load_bc(g, tl, f->Bm, f->sB, ft->bb, tb1[i], tb2[i], bv);
      load_bc(g, tl, f->Cm, f->sC, ft->bc, tb1[i], tb2[i], cv);
      for (int64_t n = 0; n < g->N; n++) {
        float *hn_ = h + n * LANES;
        float e[LANES];
        decay_lanes(dt, a2 + n * LANES, e);
        for (int j = 0; j < LANES; j++) {
          float hn = e[j] * hn_[j] + dtx[j] * bv[n][j];
          hn_[j] = hn;
          y[j] += hn * cv[n][j];
        }
      }
    }
  }
  for (int64_t i = 0; i < nb; i++) {  /* epilogue: gate, accumulate, store */
    float *y = yb[i];
    if (f->z) {
      float zz[LANES];
      load_lanes(f->z, ft->bz, seq_step(f->sz, tb1[i], tb2[i]), f->sz[Q_D], tl->same_batch, zz);
      for (int j = 0; j < LANES; j++) y[j] *= zz[j] * sigmoid_vec(zz[j]);
    }
    if (f->accumulate) {
      float prev[LANES];
      load_lanes(f->out, ft->bo, seq_step(f->so, tb1[i], tb2[i]), f->so[Q_D], tl->same_batch, prev);
      for (int j = 0; j < LANES; j++) y[j] += prev[j];
    }
    store_lanes(f->out, ft->bo, seq_step(f->so, tb1[i], tb2[i]), f->so[Q_D], tl, y);
  }
}

/* Forward. Two optional extensions (forward only, used by the 2-D cross-scan's inference path):
 * - low-rank step sizes (shape[S_DT_RANK] = R > 0): instead of `delta`, the step-size input of channel d
 *   is sum_r dts[b, r, t] * dt_w[d, r], with dts addressed like B (strides b, -, r, s1, s2). This is the
 *   Δ projection of Mamba's x_proj/dt_proj fused into the scan: the (batch, dim, L) Δ is never stored.
 * - shape[S_ACCUMULATE]: out += y instead of out = y (routes of a cross-scan summed in place).
 * `saved` may be NULL when no backward will follow.
 *
 * Tiles are walked in groups of up to TILE_GROUP, block of STEP_BLOCK steps by block: the tiles of a
 * group read the same steps' B/C/Δ cache lines and pages one after another, so a long 2-D route costs
 * one set of cache and TLB misses per step per group instead of per tile. */
int vim2_scan_fwd(const int64_t *shape,
                  const float *u, const int64_t *su, const float *delta, const int64_t *sdl,
                  const float *A, const float *Bm, const int64_t *sB, const float *Cm, const int64_t *sC,
                  const float *Dv, const float *z, const int64_t *sz, const float *bias, const float *init,
                  float *out, const int64_t *so, float *last, float *saved,
                  const float *dts, const int64_t *sdr, const float *dt_w) {
  const Geometry g = geometry(shape);
  const FwdArgs f = {u, delta, A, Bm, Cm, Dv, z, bias, init, dts, dt_w, su, sdl, sB, sC, sz, so, sdr,
                     out, last, saved, shape[S_DT_RANK], (int)shape[S_ACCUMULATE]};
  if (g.N > MAX_STATE) return 3;
  if (f.rank > MAX_DT_RANK) return 4;
  const int64_t n_tiles = (g.rows + LANES - 1) / LANES;
  const int nthreads = thread_count(shape);
  /* as many tiles per group as keeps every thread busy, at most TILE_GROUP */
  int64_t per_group = (n_tiles + nthreads - 1) / nthreads;
  per_group = per_group < 1 ? 1 : (per_group > TILE_GROUP ? TILE_GROUP : per_group);
  const int64_t n_groups = (n_tiles + per_group - 1) / per_group;
  const int64_t state_floats = g.N * LANES, weight_floats = (f.rank ? f.rank : 1) * LANES;
  int failed = 0;
  (void)nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t group = 0; group < n_groups; group++) {
    const int64_t first = group * per_group;
    const int64_t count = n_tiles - first < per_group ? n_tiles - first : per_group;
    FwdTile *ft = malloc(sizeof(FwdTile) * (size_t)count);
    float *buf = malloc(sizeof(float) * (size_t)(count * (2 * state_floats + weight_floats)));
    if (!ft || !buf) {
      failed = 1;
      free(ft);
      free(buf);
      continue;
    }
    float *h = buf, *a2 = h + count * state_floats, *w = a2 + count * state_floats;
    for (int64_t k = 0; k < count; k++)
      fwd_tile_setup(&g, &f, first + k, &ft[k], h + k * state_floats, a2 + k * state_floats, w + k * weight_floats);
    for (int64_t s0 = 0, save_at = 0; s0 < g.L; s0 += STEP_BLOCK) {
      const int64_t nb = g.L - s0 < STEP_BLOCK ? g.L - s0 : STEP_BLOCK;
      for (int64_t k = 0; k < count; k++)
        fwd_tile_block(&g, &f, &ft[k], h + k * state_floats, a2 + k * state_floats, w + k * weight_floats,
                       s0, nb, save_at);
      while (save_at < s0 + nb) save_at += g.chunk;
    }
    for (int64_t k = 0; k < count; k++)
      for (int j = 0; j < LANES; j++)
        if (ft[k].tl.valid[j])
          for (int64_t n = 0; n < g.N; n++) last[ft[k].tl.row[j] * g.N + n] = h[k * state_floats + n * LANES + j];
    free(ft);
    free(buf);
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
 * summed by the caller. du/ddelta/dz are addressed through strides like the inputs.
 * shape[S_ACCUMULATE]: du += the gradient instead of du = it (the routes of a cross-scan share one du).
 * `ddelta` may be `delta` itself (same strides): each tile reads a chunk's Δ in its prologue before its
 * walk writes that chunk's dΔ, chunks go last to first and tiles own disjoint rows, so no Δ is
 * overwritten before it is read (the cross-scan's backward uses one buffer for both). */
int vim2_scan_bwd(const int64_t *shape,
                  const float *u, const int64_t *su, const float *delta, const int64_t *sdl,
                  const float *A, const float *Bm, const int64_t *sB, const float *Cm, const int64_t *sC,
                  const float *Dv, const float *z, const int64_t *sz, const float *bias,
                  const float *saved, const float *dout, const int64_t *sdo, const float *dlast,
                  float *du, const int64_t *sdu, float *ddelta, const int64_t *sddl, float *dz, const int64_t *sdz,
                  float *dA_rows, float *dB, float *dC, float *dD_rows, float *dbias_rows, float *dinit) {
  const Geometry g = geometry(shape);
  if (g.N > MAX_STATE) return 3;
  const int accumulate_du = (int)shape[S_ACCUMULATE];
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
    /* heap: the chunk's states, chunk * N * LANES floats, packed by the real N (with MAX_STATE rows per
       step, 3/4 of every 8 KB step would be unused at N = 16: 4x the pages and L2); the rest is
       fixed-size so that the compiler knows nothing aliases. The decays are not stored: the reverse walk
       recomputes them (8 vector operations per 16) rather than reading them back from L2: the backward is
       bound by that traffic more than by arithmetic (forward+backward 1.2x faster, docs/kernels.md). */
    float *scratch = malloc(sizeof(float) * (size_t)((g.N + 3) * g.chunk * LANES));
    if (!scratch) { failed = 1; continue; }
    float *hs = scratch;
    /* per step of the chunk: dt, dt * u and d softplus / dv (1 without softplus) */
    float (*dtc)[LANES] = (float (*)[LANES])(hs + g.chunk * g.N * LANES);
    float (*dtxc)[LANES] = dtc + g.chunk, (*dspc)[LANES] = dtxc + g.chunk;
#define STEP_STATES(base, i) ((float (*)[LANES])((base) + (i) * g.N * LANES))
    float h0[MAX_STATE][LANES], a[MAX_STATE][LANES], a2[MAX_STATE][LANES], G[MAX_STATE][LANES];
    float dAacc[MAX_STATE][LANES];
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
        a2[n][j] = a[n][j] * LOG2E_F;  /* as in the forward: with the same Δ input the recomputed states match
                                          it bit for bit (a low-rank Δ, rebuilt by a matmul, to rounding) */
        G[n][j] = dlast ? dlast[tl.row[j] * g.N + n] : 0.0f;
        dAacc[n][j] = 0.0f;
      }
    }
    for (int64_t c = g.n_chunks - 1; c >= 0; c--) {
      int64_t s0 = c * g.chunk, s1 = s0 + g.chunk < g.L ? s0 + g.chunk : g.L;
      /* the state entering the chunk */
      for (int j = 0; j < LANES; j++)
        for (int64_t n = 0; n < g.N; n++) h0[n][j] = saved[(tl.row[j] * g.n_chunks + c) * g.N + n];
      int64_t t1, t2, p1, p2;
      /* element-wise prologue of the chunk (independent steps: their softplus latencies overlap, and
         neither the recompute nor the reverse walk evaluates a softplus or sigmoid again) */
      cursor_set(&g, s0, &t1, &t2);
      cursor_set(&g, s0 + PREFETCH_AHEAD < s1 ? s0 + PREFETCH_AHEAD : s1 - 1, &p1, &p2);
      for (int64_t s = s0; s < s1; s++, cursor_move(&g, 1, &t1, &t2)) {
        if (s + PREFETCH_AHEAD < s1) {  /* the passes below then find the chunk in cache */
          prefetch_step(u, su, bu[0], delta, sdl, bd[0], Bm, sB, bb[0], Cm, sC, bc[0], z, sz, bz[0], p1, p2);
          prefetch_lanes(dout, sdo, bdo[0], p1, p2);
          cursor_move(&g, 1, &p1, &p2);
        }
        float x[LANES], v[LANES];
        float *dt = dtc[s - s0], *dsp = dspc[s - s0];
        load_lanes(u, bu, seq_step(su, t1, t2), su[Q_D], tl.same_batch, x);
        load_lanes(delta, bd, seq_step(sdl, t1, t2), sdl[Q_D], tl.same_batch, v);
        for (int j = 0; j < LANES; j++) v[j] += dbias[j];
        step_sizes(g.softplus, v, dt);
        for (int j = 0; j < LANES; j++) dtxc[s - s0][j] = dt[j] * x[j];
        if (g.softplus)
          for (int j = 0; j < LANES; j++) dsp[j] = softplus_grad_vec(v[j]);
        else
          for (int j = 0; j < LANES; j++) dsp[j] = 1.0f;
      }
      /* recompute the chunk's states */
      cursor_set(&g, s0, &t1, &t2);
      for (int64_t s = s0; s < s1; s++, cursor_move(&g, 1, &t1, &t2)) {
        const float *dt = dtc[s - s0], *dtx = dtxc[s - s0];
        float (*prev)[LANES] = s == s0 ? h0 : STEP_STATES(hs, s - s0 - 1);
        float (*hk)[LANES] = STEP_STATES(hs, s - s0);
        if (tl.shared) {
          const int64_t ob = bb[0] + t1 * sB[P_1] + t2 * sB[P_2];
          for (int64_t n = 0; n < g.N; n++) {
            const float bn = Bm[ob + n * sB[P_N]];
            float e[LANES];
            decay_lanes(dt, a2[n], e);
            for (int j = 0; j < LANES; j++) hk[n][j] = e[j] * prev[n][j] + dtx[j] * bn;
          }
        } else {
          load_bc(&g, &tl, Bm, sB, bb, t1, t2, bv);
          for (int64_t n = 0; n < g.N; n++) {
            float e[LANES];
            decay_lanes(dt, a2[n], e);
            for (int j = 0; j < LANES; j++) hk[n][j] = e[j] * prev[n][j] + dtx[j] * bv[n][j];
          }
        }
      }
      /* walk the chunk backwards */
      cursor_set(&g, s1 - 1, &t1, &t2);
      /* the walk reads u and dout and writes du and ddelta of step s - WALK_PREFETCH soon: fetched now
         (the prologue's prefetches are long evicted by then; measured: forward+backward 1.13x on a
         row-major route, 1.03-1.1x on column-major ones, results unchanged) */
      int64_t q1, q2;
      cursor_set(&g, s1 - 1 - WALK_PREFETCH >= s0 ? s1 - 1 - WALK_PREFETCH : s0, &q1, &q2);
      for (int64_t s = s1 - 1; s >= s0; s--, cursor_move(&g, -1, &t1, &t2)) {
        if (s - WALK_PREFETCH >= s0) {
          prefetch_lanes(u, su, bu[0], q1, q2);
          prefetch_lanes(dout, sdo, bdo[0], q1, q2);
          prefetch_lanes(du, sdu, bdu[0], q1, q2);
          prefetch_lanes(ddelta, sddl, bdd[0], q1, q2);
          cursor_move(&g, -1, &q1, &q2);
        }
        const int64_t t = t1 * g.L2 + t2;
        float x[LANES], gy[LANES], ddt[LANES], dx[LANES];
        const float *dt = dtc[s - s0];
        if (!tl.shared || z) load_bc(&g, &tl, Cm, sC, bc, t1, t2, cv);  /* per-lane C, or the dz recompute's */
        if (!tl.shared) load_bc(&g, &tl, Bm, sB, bb, t1, t2, bv);
        float (*h)[LANES] = STEP_STATES(hs, s - s0);
        float (*prev)[LANES] = s == s0 ? h0 : STEP_STATES(hs, s - s0 - 1);
        load_lanes(u, bu, seq_step(su, t1, t2), su[Q_D], tl.same_batch, x);
        load_lanes(dout, bdo, seq_step(sdo, t1, t2), sdo[Q_D], tl.same_batch, gy);
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
        /* Per state n, with Gn = dL/dh_t = gy C_t + (carry in G) and q = Gn e_t h_{t-1}:
           dC_t[n] = sum over lanes of gy h_t, dB_t[n] of Gn dt x, dA += q dt, G <- Gn e_t (carry to t-1), and
           over n: ddt = x sum(Gn B) + sum(A q), dx = dt sum(Gn B) (+ D gy). Factoring dt and x out of the
           sums over n leaves 8 vector operations per state and lane vector besides the decay (there were 15).
           The two sums over n are split into interleaved partials (one running sum would be a serial chain). */
        const float *dtx = dtxc[s - s0];
        float gb2[2][LANES] = {{0.0f}}, qa2[2][LANES] = {{0.0f}};
        float dBs[MAX_STATE][LANES], dCs[MAX_STATE][LANES];  /* per-lane dB/dC of this step */
        for (int64_t n = 0; n < g.N; n++) {
          float e[LANES];  /* the decay of step t (bitwise the recompute's) */
          decay_lanes(dt, a2[n], e);
          if (tl.shared) {
            const float bn = Bm[bb[0] + n * sB[P_N] + t1 * sB[P_1] + t2 * sB[P_2]];
            const float cn = Cm[bc[0] + n * sC[P_N] + t1 * sC[P_1] + t2 * sC[P_2]];
            for (int j = 0; j < LANES; j++) {
              float Gn = G[n][j] + gy[j] * cn, carry = Gn * e[j], q = carry * prev[n][j];
              dCs[n][j] = gy[j] * h[n][j];
              dBs[n][j] = Gn * dtx[j];
              gb2[n & 1][j] += Gn * bn;
              qa2[n & 1][j] += a[n][j] * q;
              dAacc[n][j] += q * dt[j];
              G[n][j] = carry;
            }
          } else {
            for (int j = 0; j < LANES; j++) {
              float Gn = G[n][j] + gy[j] * cv[n][j], carry = Gn * e[j], q = carry * prev[n][j];
              dCs[n][j] = gy[j] * h[n][j];
              dBs[n][j] = Gn * dtx[j];
              gb2[n & 1][j] += Gn * bv[n][j];
              qa2[n & 1][j] += a[n][j] * q;
              dAacc[n][j] += q * dt[j];
              G[n][j] = carry;
            }
          }
        }
        if (tl.shared) {  /* one (batch, group): dB/dC of the step are sums over the tile's lanes */
          /* all lanes are valid (rows of one (batch, group), aligned) unless this is the last tile */
          if (!tl.same_batch)
            for (int64_t n = 0; n < g.N; n++)
              for (int j = 0; j < LANES; j++) { dCs[n][j] *= vmask[j]; dBs[n][j] *= vmask[j]; }
          float sc[MAX_STATE], sb[MAX_STATE];
          lane_sums((const float (*)[LANES])dCs, g.N, sc);
          lane_sums((const float (*)[LANES])dBs, g.N, sb);
          for (int64_t n = 0; n < g.N; n++) {
            dC_t[bcg[0] + t * g.bc_t + n * g.bc_n] += sc[n];
            dB_t[bcg[0] + t * g.bc_t + n * g.bc_n] += sb[n];
          }
        } else  /* per lane: its (batch, group) slot of the partials */
          for (int j = 0; j < LANES; j++) {
            if (!tl.valid[j]) continue;
            float *pc = dC_t + bcg[j] + t * g.bc_t, *pb = dB_t + bcg[j] + t * g.bc_t;
            for (int64_t n = 0; n < g.N; n++) {
              pc[n * g.bc_n] += dCs[n][j];
              pb[n * g.bc_n] += dBs[n][j];
            }
          }
        for (int j = 0; j < LANES; j++) {
          float gb = gb2[0][j] + gb2[1][j];
          ddt[j] = x[j] * gb + (qa2[0][j] + qa2[1][j]);
          dx[j] += dt[j] * gb;
        }
        float dv[LANES];
        for (int j = 0; j < LANES; j++) dv[j] = ddt[j] * dspc[s - s0][j];
        for (int j = 0; j < LANES; j++) dbacc[j] += dv[j];
        if (accumulate_du) {  /* the other routes' du, added here */
          float du_other[LANES];
          load_lanes(du, bdu, seq_step(sdu, t1, t2), sdu[Q_D], tl.same_batch, du_other);
          for (int j = 0; j < LANES; j++) dx[j] += du_other[j];
        }
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
#undef STEP_STATES
  }
  return failed ? 2 : 0;
}
