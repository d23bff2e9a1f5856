/* The small ops of one decode step of a Llama-family decoder (compute/lean_decoder.py), one call each where
 * PyTorch runs five to ten: at 16 rows a 135M model's decode step is bound by per-op overhead, not arithmetic.
 * Compiled at first use by compute/decode_kernels.py with the system C compiler; no PyTorch headers, raw pointers only.
 *
 * Numerics follow the PyTorch ops they replace under bf16 autocast: the residual stream and RMSNorm in fp32, every
 * value that PyTorch stores in bf16 rounded to bf16 (round to nearest even) at the same point, RoPE in fp32. The
 * attention is computed in fp32 from the bf16 q, k, v (PyTorch's CPU flash kernel rounds its probabilities to bf16
 * for the second product; here they stay fp32), so outputs agree to bf16 rounding, not bit for bit.
 *
 * Notation: n rows, H query heads, K key/value heads (H = K * rep), D head dim, E hidden size, I MLP width,
 * L cache capacity (slots), S valid slots after this step (start + 1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef uint16_t bf16;

/* bf16 <-> fp32 over arrays, as integer loops on the bits (compiled with -fno-strict-aliasing), which the compiler
 * vectorises where per-element type punning would stop it. */
static inline void load_bf16(const bf16 *src, float *dst, int n) {
  uint32_t *d = (uint32_t *)dst;
  for (int i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

static inline void round_bf16(float *x, int n) {  /* x := the fp32 value of bf16(x), round to nearest even */
  uint32_t *u = (uint32_t *)x;
  for (int i = 0; i < n; i++) {
    uint32_t nan = u[i] | 0x400000u;               /* a NaN stays a (quiet) NaN */
    uint32_t r = (u[i] + 0x7fffu + ((u[i] >> 16) & 1u)) & 0xffff0000u;
    u[i] = (u[i] & 0x7fffffffu) > 0x7f800000u ? nan : r;
  }
}

static inline void store_bf16(const float *src, bf16 *dst, int n) {   /* round to nearest even, as torch's cast */
  const uint32_t *u = (const uint32_t *)src;
  for (int i = 0; i < n; i++) {
    uint32_t nan = (u[i] >> 16) | 0x40u;
    uint32_t r = (u[i] + 0x7fffu + ((u[i] >> 16) & 1u)) >> 16;
    dst[i] = (bf16)((u[i] & 0x7fffffffu) > 0x7f800000u ? nan : r);
  }
}

#define BLOCK 512                                  /* floats of stack scratch per array */

#ifdef __AVX512F__
static inline __m512 bf16x16(const bf16 *p) {      /* 16 bf16 -> 16 fp32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* x [n] := e^x in place (n <= BLOCK): Cephes' expf range reduction and polynomial (~1 ulp; 0 below -87.3, where
 * e^x is subnormal, inf above 88.7), in loops the compiler vectorises (libm's expf is a call per element). */
static inline void exp_block(float *x, int n) {
  float p[BLOCK];
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
    p[i] = q * r * r + r + 1.0f;
    e[i] = ((int32_t)k + 127) << 23;                                      /* 2^k */
  }
  const float *scale = (const float *)e;
  for (int i = 0; i < n; i++) x[i] = x[i] < -87.3f ? 0.0f : (x[i] > 88.7f ? INFINITY : p[i] * scale[i]);
}

/* h [n, E] fp32 += delta [n, E] bf16 (delta may be NULL), then out [n, E] bf16 = w * (h / rms(h)), as
 * F.rms_norm(h, w) (mean of squares in fp32) followed by a cast to bf16. */
void add_rms_cast(float *h, const bf16 *delta, const float *w, bf16 *out, int n, int E, float eps) {
  float t[BLOCK];
  for (int r = 0; r < n; r++) {
    float *x = h + (long)r * E;
    if (delta)
      for (int i0 = 0; i0 < E; i0 += BLOCK) {
        int m = E - i0 < BLOCK ? E - i0 : BLOCK;
        load_bf16(delta + (long)r * E + i0, t, m);
        for (int i = 0; i < m; i++) x[i0 + i] += t[i];
      }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < E; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)E + eps);
    for (int i0 = 0; i0 < E; i0 += BLOCK) {
      int m = E - i0 < BLOCK ? E - i0 : BLOCK;
      for (int i = 0; i < m; i++) t[i] = w[i0 + i] * (x[i0 + i] * inv);
      store_bf16(t, out + (long)r * E + i0, m);
    }
  }
}

/* out [n, I] bf16 = silu(g) * u, gu [n, 2I] bf16 (gate columns, then up): silu's output rounded to bf16 before
 * the product, as F.silu(g) * u on bf16 tensors computes. */
void silu_mul(const bf16 *gu, bf16 *out, int n, int I) {
  float g[BLOCK], u[BLOCK];
  for (int r = 0; r < n; r++)
    for (int i0 = 0; i0 < I; i0 += BLOCK) {
      int m = I - i0 < BLOCK ? I - i0 : BLOCK;
      load_bf16(gu + (long)r * 2 * I + i0, g, m);
      load_bf16(gu + (long)r * 2 * I + I + i0, u, m);
      float e[BLOCK];
      for (int i = 0; i < m; i++) e[i] = -g[i];
      exp_block(e, m);
      for (int i = 0; i < m; i++) g[i] = e[i] == INFINITY ? copysignf(0.0f, g[i]) : g[i] / (1.0f + e[i]);
      round_bf16(g, m);
      for (int i = 0; i < m; i++) g[i] *= u[i];
      store_bf16(g, out + (long)r * I + i0, m);
    }
}

/* x [D] := RoPE of x at one position (rotate-half form): x1 c - x2 s, x2 c + x1 s, in fp32 */
static inline void rope(float *x, const float *c, const float *s, int D) {
  const int half = D / 2;
  float y[BLOCK];
  for (int d = 0; d < half; d++) {
    y[d] = x[d] * c[d] - x[d + half] * s[d];
    y[d + half] = x[d + half] * c[d + half] + x[d] * s[d + half];
  }
  memcpy(x, y, (size_t)D * sizeof(float));
}

/* One decode step's attention for one layer. qkv [n, (H + 2K) D] bf16: the fused projection's output for the new
 * token of each row. RoPE (HF's rotate-half form, in fp32, rounded to bf16) on q and k with cos, sin [n, D] fp32;
 * the key written into slot `start` of kt [n, K, D, L] (keys transposed: the scores are then a sum of D rows over
 * the slots, with no horizontal sums), the value into vc [n, K, L, D] bf16; then each query head attends, with
 * `scale`, to the slots t <= start whose keys[r * key_stride + t] is nonzero. The slots are read in whole vectors
 * of 16, start + 1 rounded up: L must be at least that, and keys zero past start. out [n, H D] bf16. scratch: at
 * least rep * (S + D) + max(D, S) floats (S = start + 1 rounded up to 16, rep = H / K). */
static inline __attribute__((always_inline)) void attend(
    const bf16 *qkv, const float *cos, const float *sin, bf16 *kt, bf16 *vc, const uint8_t *keys, long key_stride,
    bf16 *out, float *scratch, int n, int H, int K, const int D, const int rep, int L, int start, float scale) {
  const int S = (start + 16) & ~15;  /* slots 0 .. start, rounded up to whole vectors (L >= S) */
  float *scores = scratch;                       /* [rep, S] */
  float *q = scores + (long)rep * S;             /* [rep, D]: the queries, then the outputs */
  float *kv = q + (long)rep * D;                 /* [max(D, S)] one key, value or key row in fp32 */
  for (int r = 0; r < n; r++) {
    const bf16 *row = qkv + (long)r * (H + 2 * K) * D;
    const float *c = cos + (long)r * D, *s = sin + (long)r * D;
    const uint8_t *valid = keys + (long)r * key_stride;
    for (int g = 0; g < K; g++) {
      bf16 *kbase = kt + ((long)r * K + g) * D * L, *vbase = vc + ((long)r * K + g) * L * D;
      /* the new key (roped, rounded to bf16) into column `start`, the value into row `start` */
      bf16 knew[BLOCK];
      load_bf16(row + (long)(H + g) * D, kv, D);
      rope(kv, c, s, D);
      store_bf16(kv, knew, D);
      for (int d = 0; d < D; d++) kbase[(long)d * L + start] = knew[d];
      memcpy(vbase + (long)start * D, row + (long)(H + K + g) * D, (size_t)D * sizeof(bf16));
      /* the rep query heads of this key head, roped and rounded as q is in bf16, scaled */
      for (int j = 0; j < rep; j++) {
        load_bf16(row + (long)(g * rep + j) * D, q + (long)j * D, D);
        rope(q + (long)j * D, c, s, D);
        round_bf16(q + (long)j * D, D);
      }
      /* scores [rep, S] = q k^T: 16 slots at a time, summed over the key dimension in registers */
      for (int t0 = 0; t0 < S; t0 += 16) {
#ifdef __AVX512F__
        /* two independent sums per head (even and odd key dimensions) hide the FMA latency; rep is a constant
           here, so the sums stay in registers */
        __m512 a[rep], b[rep];
        for (int j = 0; j < rep; j++) a[j] = b[j] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 2) {
          __m512 k0 = bf16x16(kbase + (long)d * L + t0), k1 = bf16x16(kbase + (long)(d + 1) * L + t0);
          for (int j = 0; j < rep; j++) {
            a[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[(long)j * D + d]), k0, a[j]);
            b[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[(long)j * D + d + 1]), k1, b[j]);
          }
        }
        for (int j = 0; j < rep; j++) _mm512_storeu_ps(scores + (long)j * S + t0, _mm512_add_ps(a[j], b[j]));
#else
        for (int j = 0; j < rep; j++) {
          float a[16] = {0.0f}, k16[16];
          for (int d = 0; d < D; d++) {
            load_bf16(kbase + (long)d * L + t0, k16, 16);
            for (int t = 0; t < 16; t++) a[t] = fmaf(q[(long)j * D + d], k16[t], a[t]);
          }
          memcpy(scores + (long)j * S + t0, a, sizeof a);
        }
#endif
      }
      /* softmax over the valid slots */
      for (int j = 0; j < rep; j++) {
        float *sc = scores + (long)j * S;
        float m = -INFINITY;
        for (int t = 0; t < S; t++) sc[t] = valid[t] ? sc[t] * scale : -INFINITY;
#pragma omp simd reduction(max : m)
        for (int t = 0; t < S; t++) m = sc[t] > m ? sc[t] : m;
        for (int t = 0; t < S; t++) sc[t] -= m;
        for (int t0 = 0; t0 < S; t0 += BLOCK) exp_block(sc + t0, S - t0 < BLOCK ? S - t0 : BLOCK);
        for (int t = 0; t < S; t++) sc[t] = valid[t] ? sc[t] : 0.0f;    /* (e^-inf clamps to e^-87: zero it) */
        float z = 0.0f;
#pragma omp simd reduction(+ : z)
        for (int t = 0; t < S; t++) z += sc[t];
        float inv = 1.0f / z;
        for (int t = 0; t < S; t++) sc[t] *= inv;
      }
      /* out = probabilities x values, all rep heads at once per slot, summed in registers (q's rows hold it) */
#ifdef __AVX512F__
      __m512 o[rep][D / 16];
      for (int j = 0; j < rep; j++)
        for (int i = 0; i < D / 16; i++) o[j][i] = _mm512_setzero_ps();
      for (int t = 0; t < S; t++) {
        if (!valid[t]) continue;
        __m512 v[D / 16];
        for (int i = 0; i < D / 16; i++) v[i] = bf16x16(vbase + (long)t * D + 16 * i);
        for (int j = 0; j < rep; j++) {
          __m512 p = _mm512_set1_ps(scores[(long)j * S + t]);
          for (int i = 0; i < D / 16; i++) o[j][i] = _mm512_fmadd_ps(p, v[i], o[j][i]);
        }
      }
      for (int j = 0; j < rep; j++)
        for (int i = 0; i < D / 16; i++) _mm512_storeu_ps(q + (long)j * D + 16 * i, o[j][i]);
#else
      for (int j = 0; j < rep; j++)
        for (int d = 0; d < D; d++) q[(long)j * D + d] = 0.0f;
      for (int t = 0; t < S; t++) {
        if (!valid[t]) continue;
        load_bf16(vbase + (long)t * D, kv, D);
        for (int j = 0; j < rep; j++)
          for (int d = 0; d < D; d++) q[(long)j * D + d] = fmaf(scores[(long)j * S + t], kv[d], q[(long)j * D + d]);
      }
#endif
      for (int j = 0; j < rep; j++) store_bf16(q + (long)j * D, out + ((long)r * H + g * rep + j) * D, D);
    }
  }
}

void rope_attend(const bf16 *qkv, const float *cos, const float *sin, bf16 *kt, bf16 *vc, const uint8_t *keys,
                 long key_stride, bf16 *out, float *scratch, int n, int H, int K, int D, int L, int start,
                 float scale) {
  const int rep = H / K;   /* the common head sizes and group sizes as constants: the inner loops unroll */
#define ATTEND(d, r) attend(qkv, cos, sin, kt, vc, keys, key_stride, out, scratch, n, H, K, d, r, L, start, scale)
  if (D == 64 && rep == 3) ATTEND(64, 3);
  else if (D == 64 && rep == 4) ATTEND(64, 4);
  else if (D == 64 && rep == 2) ATTEND(64, 2);
  else if (D == 128 && rep == 4) ATTEND(128, 4);
  else if (D == 128 && rep == 8) ATTEND(128, 8);
  else ATTEND(D, rep);
#undef ATTEND
}
