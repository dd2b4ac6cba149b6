// The arithmetic of cpu_attention.cpp (included by it, one translation unit): float32 exp/tanh that
// vectorise, the score and value-accumulation loops of a block of query rows over a tile of K/V rows
// (AVX-512 or AVX2 intrinsics where the compiler targets them, else portable loops), and the
// conversions of cache, query and output rows to and from float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace pageant_cpu {


constexpr int64_t kTile = 32;  // key positions per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) in float32 (Cephes' polynomial, about 1 ulp), written so that loops over it vectorise;
// exp(x) = 0 below -87.3 (so exp(-inf) = 0).
__attribute__((always_inline)) inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  float f = xc - k * 0.693359375f;
  f = f - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return x < -87.3f ? 0.0f : p * two_k;
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|): absolute error about 1e-7
__attribute__((always_inline)) inline float fast_tanh(float x) {
  const float e = fast_exp(-2.0f * std::abs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// ---- scores s[i * kTile + t] = q_i . k_t and acc_i += sum_t p[i * kTile + t] v_t for tokens a <= t < b
// and rows i < R: the R (up to kRowBlock) rows of a block share every K/V load
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t kWidth = 16;
constexpr int kRowBlock = 4;  // 32 vector registers
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec x) { _mm512_storeu_ps(p, x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vzero() { return _mm512_setzero_ps(); }
inline __m256 fold(vec x) {  // lanes i and i + 8 added
  return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#else
using vec = __m256;
constexpr int64_t kWidth = 8;
constexpr int kRowBlock = 2;  // 16 vector registers
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec x) { _mm256_storeu_ps(p, x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vzero() { return _mm256_setzero_ps(); }
inline __m256 fold(vec x) { return x; }
#endif

inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {  // {sum(a0), sum(a1), sum(a2), sum(a3)}
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float row_max(const float* s, int64_t a, int64_t b) {  // max of s[a .. b - 1]
  float mx = kNegInf;
  int64_t t = a;
  if (b - a >= 8) {
    __m256 m = _mm256_loadu_ps(s + t);
    for (t += 8; t + 8 <= b; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  for (; t < b; ++t) mx = std::max(mx, s[t]);
  return mx;
}

// out[i * 4 + t] = q_i . k[t] for t < 4, i < R (named accumulators, so that they stay in registers)
template <int R>
inline void dots4(const float* q, const float* const* k, int64_t d, float* out) {
  const float *q1 = q + std::min(1, R - 1) * d, *q2 = q + std::min(2, R - 1) * d, *q3 = q + (R - 1) * d;
  vec a0 = vzero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  vec c0 = a0, c1 = a0, c2 = a0, c3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;
  int64_t c = 0;
  for (; c + kWidth <= d; c += kWidth) {
    const vec k0 = vload(k[0] + c), k1 = vload(k[1] + c), k2 = vload(k[2] + c), k3 = vload(k[3] + c);
    vec x = vload(q + c);
    a0 = vfma(x, k0, a0), a1 = vfma(x, k1, a1), a2 = vfma(x, k2, a2), a3 = vfma(x, k3, a3);
    if constexpr (R > 1) {
      x = vload(q1 + c);
      b0 = vfma(x, k0, b0), b1 = vfma(x, k1, b1), b2 = vfma(x, k2, b2), b3 = vfma(x, k3, b3);
    }
    if constexpr (R > 2) {
      x = vload(q2 + c);
      c0 = vfma(x, k0, c0), c1 = vfma(x, k1, c1), c2 = vfma(x, k2, c2), c3 = vfma(x, k3, c3);
    }
    if constexpr (R > 3) {
      x = vload(q3 + c);
      e0 = vfma(x, k0, e0), e1 = vfma(x, k1, e1), e2 = vfma(x, k2, e2), e3 = vfma(x, k3, e3);
    }
  }
  _mm_storeu_ps(out, hsum4(fold(a0), fold(a1), fold(a2), fold(a3)));
  if constexpr (R > 1) _mm_storeu_ps(out + 4, hsum4(fold(b0), fold(b1), fold(b2), fold(b3)));
  if constexpr (R > 2) _mm_storeu_ps(out + 8, hsum4(fold(c0), fold(c1), fold(c2), fold(c3)));
  if constexpr (R > 3) _mm_storeu_ps(out + 12, hsum4(fold(e0), fold(e1), fold(e2), fold(e3)));
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < 4; ++t)
      for (int64_t cc = c; cc < d; ++cc) out[i * 4 + t] += q[i * d + cc] * k[t][cc];
}

template <int R>
inline void scores_rows(const float* q, const float* const* krow, int64_t a, int64_t b, int64_t d, float* s) {
  float out[R * 4];
  for (int64_t t = a; t < b; t += 4) {
    const int64_t n = std::min<int64_t>(4, b - t);
    const float* k[4];
    for (int u = 0; u < 4; ++u) k[u] = krow[t + std::min<int64_t>(u, n - 1)];  // a short group repeats its last
    dots4<R>(q, k, d, out);
    for (int i = 0; i < R; ++i)
      for (int64_t u = 0; u < n; ++u) s[i * kTile + t + u] = out[i * 4 + u];
  }
}

template <int R>
inline void accumulate_rows(float* acc, const float* p, const float* const* vrow, int64_t a, int64_t b, int64_t d) {
  int64_t c = 0;
  for (; c + 4 * kWidth <= d; c += 4 * kWidth) {  // 4 vectors of each row's accumulator stay in registers
    vec y[R][4];
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 4; ++u) y[i][u] = vload(acc + i * d + c + kWidth * u);
    for (int64_t t = a; t < b; ++t) {
      const float* v = vrow[t] + c;
      const vec v0 = vload(v), v1 = vload(v + kWidth), v2 = vload(v + 2 * kWidth), v3 = vload(v + 3 * kWidth);
      for (int i = 0; i < R; ++i) {
        const vec pt = vset1(p[i * kTile + t]);
        y[i][0] = vfma(pt, v0, y[i][0]), y[i][1] = vfma(pt, v1, y[i][1]);
        y[i][2] = vfma(pt, v2, y[i][2]), y[i][3] = vfma(pt, v3, y[i][3]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 4; ++u) vstore(acc + i * d + c + kWidth * u, y[i][u]);
  }
  for (; c + kWidth <= d; c += kWidth) {
    vec y[R];
    for (int i = 0; i < R; ++i) y[i] = vload(acc + i * d + c);
    for (int64_t t = a; t < b; ++t) {
      const vec v0 = vload(vrow[t] + c);
      for (int i = 0; i < R; ++i) y[i] = vfma(vset1(p[i * kTile + t]), v0, y[i]);
    }
    for (int i = 0; i < R; ++i) vstore(acc + i * d + c, y[i]);
  }
  for (int i = 0; i < R; ++i)
    for (int64_t t = a; t < b; ++t)
      for (int64_t cc = c; cc < d; ++cc) acc[i * d + cc] += p[i * kTile + t] * vrow[t][cc];
}
#else  // portable loops (the compiler vectorises them)
constexpr int kRowBlock = 4;

inline float row_max(const float* s, int64_t a, int64_t b) {  // max of s[a .. b - 1]
  float mx = kNegInf;
  for (int64_t t = a; t < b; ++t) mx = std::max(mx, s[t]);
  return mx;
}

template <int R>
inline void scores_rows(const float* q, const float* const* krow, int64_t a, int64_t b, int64_t d, float* s) {
  for (int i = 0; i < R; ++i)
    for (int64_t t = a; t < b; ++t) {
      const float* qi = q + i * d;
      const float* kt = krow[t];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += qi[c] * kt[c];
      s[i * kTile + t] = dot;
    }
}

template <int R>
inline void accumulate_rows(float* acc, const float* p, const float* const* vrow, int64_t a, int64_t b, int64_t d) {
  for (int i = 0; i < R; ++i)
    for (int64_t t = a; t < b; ++t) {
      const float pt = p[i * kTile + t];
      const float* vt = vrow[t];
      float* ai = acc + i * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) ai[c] += pt * vt[c];
    }
}
#endif

inline void scores(const float* q, int num_rows, const float* const* krow, int64_t a, int64_t b, int64_t d,
                   float* s) {
  switch (num_rows) {
    case 4: return scores_rows<std::min(4, kRowBlock)>(q, krow, a, b, d, s);
    case 3: return scores_rows<std::min(3, kRowBlock)>(q, krow, a, b, d, s);
    case 2: return scores_rows<2>(q, krow, a, b, d, s);
    default: return scores_rows<1>(q, krow, a, b, d, s);
  }
}

inline void accumulate(float* acc, int num_rows, const float* p, const float* const* vrow, int64_t a, int64_t b,
                       int64_t d) {
  switch (num_rows) {
    case 4: return accumulate_rows<std::min(4, kRowBlock)>(acc, p, vrow, a, b, d);
    case 3: return accumulate_rows<std::min(3, kRowBlock)>(acc, p, vrow, a, b, d);
    case 2: return accumulate_rows<2>(acc, p, vrow, a, b, d);
    default: return accumulate_rows<1>(acc, p, vrow, a, b, d);
  }
}

// ---- cache rows to float32 (float32 rows are read where they lie)
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n, const float*) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(float));
    dst[i] = f;
  }
}

inline void to_float(const c10::Half* src, float* dst, int64_t n, const float*) {
#if defined(__FLT16_MAX__) && (defined(__F16C__) || defined(__aarch64__))
  const _Float16* s = reinterpret_cast<const _Float16*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
#endif
}

inline void to_float(const c10::Float8_e4m3fn* src, float* dst, int64_t n, const float* lut) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[s[i]];  // lut: value * scale, as the reference computes
}

// ---- query rows in, output rows out (per item, not in the inner loops)
inline void load_row(const void* base, at::ScalarType dtype, int64_t offset, float scale, int64_t n, float* dst) {
  if (dtype == at::kFloat) {
    const float* s = static_cast<const float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * scale;
  } else if (dtype == at::kBFloat16) {
    const c10::BFloat16* s = static_cast<const c10::BFloat16*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * scale;
  } else {
    const c10::Half* s = static_cast<const c10::Half*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * scale;
  }
}

inline void store_row(void* base, at::ScalarType dtype, int64_t offset, const float* src, float mul, int64_t n) {
  if (dtype == at::kFloat) {
    float* d = static_cast<float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
  } else if (dtype == at::kBFloat16) {
    c10::BFloat16* d = static_cast<c10::BFloat16*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i] * mul);
  } else {
    c10::Half* d = static_cast<c10::Half*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i] * mul);
  }
}

}  // namespace pageant_cpu
