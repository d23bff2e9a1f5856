/* The LM head's softmax passes (compute/logprobs.py, ChunkedHead) over bf16 logits, one pass per row where
 * PyTorch makes four to six over an fp32 copy: the log-normaliser, log-prob of the target and entropy in the
 * forward; the logits' gradient, written over the logits themselves, in the backward. Compiled at first use by
 * llmrl/compute/kernels.py with the system C compiler; raw pointers only. Rows are split over `threads` POSIX threads.
 *
 * Numerics: x = z / tau in fp32 from the bf16 logits z (PyTorch's path casts the same bf16 matmul output to fp32),
 * exp by Cephes' expf polynomial (~1 ulp), sums in fp32 over 16 lanes; the gradient is rounded to bf16 (round to
 * nearest even) as PyTorch's cast before the backward's matmuls. Notation: rows M, vocabulary (block) width B,
 * row stride ld (elements), p = softmax(x), H = -sum p log p, lse = log sum e^x.
 *
 *   forward:   lse = m + log sum e^(x - m),   logp = x[y] - lse,   H = lse - sum p x
 *   backward:  dz = (g_logp onehot(y) - p (g_logp + g_H (log p + H))) / tau
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

typedef uint16_t bf16;

#define LANES 16
#define BLOCK 1024     /* floats of stack scratch a pass */

static inline float bf16_to_f32(bf16 v) {
  union { uint32_t u; float f; } c = {(uint32_t)v << 16};
  return c.f;
}

static inline void load_scaled(const bf16 *src, float *dst, int n, float inv_tau) {
  uint32_t *d = (uint32_t *)dst;
  for (int i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
  if (inv_tau != 1.0f)
    for (int i = 0; i < n; i++) dst[i] *= inv_tau;
}

static inline void store_bf16(const float *src, bf16 *dst, int n) {   /* round to nearest even, as torch's cast */
  const uint32_t *u = (const uint32_t *)src;
  for (int i = 0; i < n; i++) {
    uint32_t nan = (u[i] >> 16) | 0x40u;
    uint32_t r = (u[i] + 0x7fffu + ((u[i] >> 16) & 1u)) >> 16;
    dst[i] = (bf16)((u[i] & 0x7fffffffu) > 0x7f800000u ? nan : r);
  }
}

/* out [n] = e^x [n]: Cephes' expf (0 below -87.3, inf above 88.7), in loops the compiler vectorises. */
static inline void exp_into(const float *x, float *out, int n) {
  int32_t e[BLOCK];
  for (int i = 0; i < n; i++) {
    float xi = x[i] < -87.0f ? -87.0f : (x[i] > 88.0f ? 88.0f : x[i]);
    float k = (xi * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    float r = xi - k * 0.693359375f + k * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    out[i] = q * r * r + r + 1.0f;
    e[i] = ((int32_t)k + 127) << 23;                                      /* 2^k */
  }
  const float *scale = (const float *)e;
  for (int i = 0; i < n; i++) out[i] = x[i] < -87.3f ? 0.0f : (x[i] > 88.7f ? INFINITY : out[i] * scale[i]);
}

static inline float lane_sum(const float *a) {
  float s = 0.0f;
  for (int l = 0; l < LANES; l++) s += a[l];
  return s;
}

/* One row of the forward: (lse, sum p x) of x = z / tau over V entries. */
static void fwd_row(const bf16 *z, int V, float inv_tau, int with_entropy, float *lse_out, float *px_out) {
  float x[BLOCK], e[BLOCK], mx[LANES], se[LANES], sx[LANES];
  for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, se[l] = 0.0f, sx[l] = 0.0f;
  for (int v0 = 0; v0 < V; v0 += BLOCK) {                      /* pass 1: the maximum */
    int n = V - v0 < BLOCK ? V - v0 : BLOCK;
    load_scaled(z + v0, x, n, inv_tau);
    int i = 0;
    for (; i + LANES <= n; i += LANES)
      for (int l = 0; l < LANES; l++) mx[l] = x[i + l] > mx[l] ? x[i + l] : mx[l];
    for (; i < n; i++) mx[0] = x[i] > mx[0] ? x[i] : mx[0];
  }
  float m = mx[0];
  for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
  if (m == -INFINITY || m != m) {                              /* all -inf, or a NaN: let it propagate */
    *lse_out = m == -INFINITY ? -INFINITY : m;
    *px_out = m;
    return;
  }
  for (int v0 = 0; v0 < V; v0 += BLOCK) {                      /* pass 2 (from cache): sum e^(x-m), sum e^(x-m) x */
    int n = V - v0 < BLOCK ? V - v0 : BLOCK;
    load_scaled(z + v0, x, n, inv_tau);
    for (int i = 0; i < n; i++) e[i] = x[i] - m;
    exp_into(e, e, n);
    int i = 0;
    for (; i + LANES <= n; i += LANES)
      for (int l = 0; l < LANES; l++) se[l] += e[i + l];
    for (; i < n; i++) se[0] += e[i];
    if (with_entropy) {
      i = 0;
      for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) sx[l] += e[i + l] * x[i + l];
      for (; i < n; i++) sx[0] += e[i] * x[i];
    }
  }
  float s = lane_sum(se);
  *lse_out = m + logf(s);
  *px_out = lane_sum(sx) / s;
}

typedef struct {
  bf16 *z;
  long ld;
  int r0, r1, V, with_entropy, v0;
  float inv_tau;
  const int64_t *y;
  float *lse, *logp, *entropy;                                 /* forward: outputs; backward: lse, H inputs */
  const float *g_logp, *g_ent;
} Job;

static void *fwd_job(void *arg) {
  Job *j = arg;
  for (int r = j->r0; r < j->r1; r++) {
    const bf16 *row = j->z + (long)r * j->ld;
    float lse, px;
    fwd_row(row, j->V, j->inv_tau, j->entropy != 0, &lse, &px);
    j->lse[r] = lse;
    j->logp[r] = bf16_to_f32(row[j->y[r]]) * j->inv_tau - lse;
    if (j->entropy) j->entropy[r] = lse - px;
  }
  return 0;
}

static void *bwd_job(void *arg) {
  Job *j = arg;
  float x[BLOCK], p[BLOCK];
  for (int r = j->r0; r < j->r1; r++) {
    bf16 *row = j->z + (long)r * j->ld;
    float lse = j->lse[r], gl = j->g_logp ? j->g_logp[r] : 0.0f, gh = j->g_ent ? j->g_ent[r] : 0.0f;
    float H = j->g_ent ? j->entropy[r] : 0.0f;
    long hit = j->g_logp ? (long)j->y[r] - j->v0 : -1;
    for (int v0 = 0; v0 < j->V; v0 += BLOCK) {
      int n = j->V - v0 < BLOCK ? j->V - v0 : BLOCK;
      load_scaled(row + v0, x, n, j->inv_tau);
      for (int i = 0; i < n; i++) x[i] -= lse;                /* log p */
      exp_into(x, p, n);
      for (int i = 0; i < n; i++) x[i] = -p[i] * (gl + gh * (x[i] + H));
      if (hit >= v0 && hit < v0 + n) x[hit - v0] += gl;
      if (j->inv_tau != 1.0f)
        for (int i = 0; i < n; i++) x[i] *= j->inv_tau;
      store_bf16(x, row + v0, n);
    }
  }
  return 0;
}

static void run_jobs(Job proto, int M, int threads, void *(*fn)(void *)) {
  if (threads < 1) threads = 1;
  if (threads > 16) threads = 16;
  if (threads > M) threads = M > 0 ? M : 1;
  Job jobs[16];
  pthread_t tid[16];
  int started[16] = {0};
  for (int t = 0; t < threads; t++) {
    jobs[t] = proto;
    jobs[t].r0 = (int)((long)M * t / threads);
    jobs[t].r1 = (int)((long)M * (t + 1) / threads);
  }
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], 0, fn, &jobs[t]) == 0;
  fn(&jobs[0]);
  for (int t = 1; t < threads; t++) {
    if (started[t]) pthread_join(tid[t], 0);
    else fn(&jobs[t]);                                         /* no thread: run that share here */
  }
}

/* z [M, V] bf16 (row stride ld), y [M] -> lse, logp [M]; entropy [M] unless NULL. */
void head_forward(const bf16 *z, long ld, int M, int V, const int64_t *y, float inv_tau, float *lse, float *logp,
                  float *entropy, int threads) {
  Job j = {(bf16 *)z, ld, 0, 0, V, entropy != 0, 0, inv_tau, y, lse, logp, entropy, 0, 0};
  run_jobs(j, M, threads, fwd_job);
}

/* z [M, B] bf16 (row stride ld): the logits of vocabulary entries v0 .. v0 + B - 1, overwritten with their
 * gradient. g_logp or g_ent may be NULL (that output got no gradient); entropy is read only with g_ent. */
void head_backward(bf16 *z, long ld, int M, int B, int v0, const int64_t *y, float inv_tau, const float *lse,
                   const float *entropy, const float *g_logp, const float *g_ent, int threads) {
  Job j = {z, ld, 0, 0, B, 0, v0, inv_tau, y, (float *)lse, 0, (float *)entropy, g_logp, g_ent};
  run_jobs(j, M, threads, bwd_job);
}
