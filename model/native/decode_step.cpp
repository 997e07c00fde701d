// Kiln's native CPU decode step: one new token per sequence through the whole model, fp32 math.
//
// At the default model's size (a few million parameters) a decode step is a few MFLOP, and
// on a CPU the torch path spends most of its time dispatching ~100 small ops per token.
// This file does the same math in one call: embedding, then per layer norm -> QKV -> RoPE
// -> write K/V into the paged cache -> attention over the row's blocks -> output projection
// -> residual -> norm -> MLP -> residual, then the final norm and the LM head. Matrix
// products read weights packed in transposed tiles once per step for the whole batch, and
// split tiles over torch's intra-op threads when large.
//
// The packed weights are fp32, or bf16 when every weight of the model is exactly a bf16
// number (a model shipped in bf16, as the default is): a decode step at small batch reads
// every weight once and little else, so half the bytes is most of the time saved. A bf16
// weight is widened to fp32 in registers (exactly: a shift) and the math stays fp32, so both
// layouts agree with the torch path on the same weights to fp32 rounding. A model quantized
// to int8 (model/quantize.py) passes int8 tiles and one fp32 scale per output row: the int8
// weights are widened to fp32 the same way and each output is scaled once at the end.
//
// It is compiled on first use by model/native/__init__.py (torch.utils.cpp_extension) and
// checked against the torch path by tests/test_native_decode.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kParallelMacs = 1 << 17;  // smaller products run on the calling thread

// Weights arrive packed in tiles of kTile output rows: tile t holds W[t*kTile : (t+1)*kTile, :]
// transposed, (I, kTile) contiguous, the last tile zero-padded (see `pack_tiles` in
// model/quantize.py). A tile is read front to back once per call, and each of its
// kTile-wide rows feeds one multiply-add per batch row into accumulators that stay in
// registers: no horizontal sums, each weight loaded once for the whole batch.
constexpr int64_t kTile = 32;
constexpr int64_t kRows = 8;  // batch rows per pass of the plain loops (the vector ones: Vec::kMaxRows)

// The widest float vector this build has (AVX-512 or AVX2 + FMA; none elsewhere), for the
// matrix products and attention loops below: kLanes floats, fused multiply-add, a sum of the
// lanes, and loads that widen kLanes bf16 or int8 weights to floats.
#if defined(__AVX512F__)
#define KILN_VECTOR 1
struct Vec {
  using T = __m512;
  static constexpr int64_t kLanes = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T broadcast(float x) { return _mm512_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
  static T widen(const float* p) { return load(p); }
  static T widen(const uint16_t* p) {  // bf16 bits: the high half of each fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static T widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static constexpr int kMaxRows = 8;  // batch rows per pass of `tile_rows`: 2 x 8 accumulators of 32 registers
};
#elif defined(__AVX2__) && defined(__FMA__)
#define KILN_VECTOR 1
struct Vec {
  using T = __m256;
  static constexpr int64_t kLanes = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T broadcast(float x) { return _mm256_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static float sum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static T widen(const float* p) { return load(p); }
  static T widen(const uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static T widen(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static constexpr int kMaxRows = 2;  // 4 x 2 accumulators and 4 weight vectors of 16 registers
};
#else
struct Vec {  // no vector path: the plain loops serve (these members only let the vector branches compile)
  using T = float;
  static constexpr int64_t kLanes = 0;
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static T broadcast(float x) { return x; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T mul(T a, T b) { return a * b; }
  static void store(float* p, T v) { *p = v; }
  static float sum(T v) { return v; }
  template <typename W>
  static T widen(const W* p);
};
#endif

inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float widen(uint16_t w) {  // bf16 bits -> the same number as fp32
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A float as a cache element: itself, or bf16 bits rounded to nearest even (as torch's .to(bfloat16)).
template <typename KT>
inline KT narrow(float x) {
  if constexpr (std::is_same_v<KT, uint16_t>) {
    return c10::BFloat16(x).x;
  } else {
    return x;
  }
}

#ifdef KILN_VECTOR
constexpr int64_t kPrefetchBytes = 8192;

// One weight tile against R batch rows: out[r][j] = sum_i W[j, i] * x[r * I + i] for the tile's kTile
// outputs j. The R x kTile sums stay in vector registers, U copies of them over interleaved i so that
// at least ~8 independent multiply-add chains are in flight (one row alone would otherwise wait on
// each add's latency); each weight vector is loaded and widened once for all R rows. The weights
// stream from memory once per step: a software prefetch kPrefetchBytes ahead keeps enough of the
// stream in flight for one core to read int8 weights near the memory's speed (GPT-2 124M shape,
// batch 1, one thread: 12.3 ms per step without it, 5.4 ms with it; bf16 and fp32 gain less).
template <int R, typename T>
inline void tile_rows(const T* w, const float* x, int64_t I, float out[][kTile]) {
  constexpr int V = kTile / Vec::kLanes;
  constexpr int U = std::max(1, std::min(4, 8 / (V * R)));
  typename Vec::T acc[U][R][V];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[u][r][v] = Vec::zero();
  auto step = [&](int u, int64_t i) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i * kTile) + kPrefetchBytes, _MM_HINT_T0);
    typename Vec::T wv[V];
    for (int v = 0; v < V; ++v) wv[v] = Vec::widen(w + i * kTile + v * Vec::kLanes);
    for (int r = 0; r < R; ++r) {
      const auto xv = Vec::broadcast(x[r * I + i]);
      for (int v = 0; v < V; ++v) acc[u][r][v] = Vec::fma(xv, wv[v], acc[u][r][v]);
    }
  };
  int64_t i = 0;
  for (; i + U <= I; i += U) {
    for (int u = 0; u < U; ++u) step(u, i + u);
  }
  for (; i < I; ++i) step(0, i);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      auto total = acc[0][r][v];
      for (int u = 1; u < U; ++u) total = Vec::add(total, acc[u][r][v]);
      Vec::store(out[r] + v * Vec::kLanes, total);
    }
  }
}

template <int R, typename T>
void tile_rows_upto(int rows, const T* w, const float* x, int64_t I, float out[][kTile]) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows_upto<R - 1>(rows, w, x, I, out);
  }
  tile_rows<R>(w, x, I, out);
}
#endif

// y[b, o] = bias[o] + scale[o] * sum_i W[o, i] * x[b, i]; W is float, bf16 bits (uint16_t) or int8;
// scale null (1) unless int8.
template <typename T>
void linear(const T* Wp, const float* scale, const float* bias, const float* x, float* y, int64_t B, int64_t O,
            int64_t I) {
  const int64_t n_tiles = (O + kTile - 1) / kTile;
  auto tiles = [&](int64_t t0, int64_t t1) {
    float acc[kRows][kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const T* w = Wp + t * I * kTile;
      const int64_t o0 = t * kTile, n = std::min(kTile, O - o0);
#ifdef KILN_VECTOR
      constexpr int64_t step = Vec::kMaxRows;
#else
      constexpr int64_t step = kRows;
#endif
      for (int64_t b0 = 0; b0 < B; b0 += step) {
        const int64_t rows = std::min(step, B - b0);
#ifdef KILN_VECTOR
        tile_rows_upto<Vec::kMaxRows>(static_cast<int>(rows), w, x + b0 * I, I, acc);
#else
        {
          float wf[kTile];
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t j = 0; j < kTile; ++j) acc[r][j] = 0.f;
          }
          for (int64_t i = 0; i < I; ++i) {
            const float* wi;
            if constexpr (std::is_same_v<T, float>) {
              wi = w + i * kTile;
            } else {
#pragma omp simd
              for (int64_t j = 0; j < kTile; ++j) wf[j] = widen(w[i * kTile + j]);
              wi = wf;
            }
            for (int64_t r = 0; r < rows; ++r) {
              const float xv = x[(b0 + r) * I + i];
#pragma omp simd
              for (int64_t j = 0; j < kTile; ++j) acc[r][j] += xv * wi[j];
            }
          }
        }
#endif
        for (int64_t r = 0; r < rows; ++r) {
          float* yr = y + (b0 + r) * O + o0;
          for (int64_t j = 0; j < n; ++j) {
            const float v = scale ? acc[r][j] * scale[o0 + j] : acc[r][j];
            yr[j] = bias ? v + bias[o0 + j] : v;
          }
        }
      }
    }
  };
  const int64_t grain = std::max<int64_t>(1, kParallelMacs / std::max<int64_t>(1, B * I * kTile));
  if (n_tiles <= grain) {
    tiles(0, n_tiles);
  } else {
    at::parallel_for(0, n_tiles, grain, tiles);
  }
}

// A packed weight (fp32, bf16, or int8 with its row scales; see `decode_step`) times x.
void linear(const torch::Tensor& W, const float* scale, const float* bias, const float* x, float* y, int64_t B,
            int64_t O, int64_t I) {
  if (W.scalar_type() == torch::kBFloat16) {
    linear(reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>()), nullptr, bias, x, y, B, O, I);
  } else if (W.scalar_type() == torch::kChar) {
    linear(W.data_ptr<int8_t>(), scale, bias, x, y, B, O, I);
  } else {
    linear(W.data_ptr<float>(), nullptr, bias, x, y, B, O, I);
  }
}

// Normalization of each row of x (B, d) into out: RMSNorm or LayerNorm, times the gain and plus
// the shift when given (null: none).
void normalize(const float* x, float* out, int64_t B, int64_t d, bool rms, float eps, const float* gain,
               const float* shift) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * d;
    float* ob = out + b * d;
    float mean = 0.f;
    if (!rms) {
#pragma omp simd reduction(+ : mean)
      for (int64_t i = 0; i < d; ++i) mean += xb[i];
      mean /= static_cast<float>(d);
    }
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; ++i) sq += (xb[i] - mean) * (xb[i] - mean);
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) ob[i] = (xb[i] - mean) * inv;
    if (gain) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) ob[i] *= gain[i];
    }
    if (shift) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) ob[i] += shift[i];
    }
  }
}

// Whether the vector path covers head dim kD (fixed at compile time, a multiple of the lanes).
template <int64_t kD>
constexpr bool kVectorized = Vec::kLanes > 0 && kD > 0 && kD % Vec::kLanes == 0;

// a . b over D numbers, b fp32 or bf16 bits (a cache row; widened exactly). With kD fixed and
// vectorized, the sum ends in one vector reduction instead of a chain of scalar adds (what a generic
// `omp simd` reduction compiles to, and what made the attention slow at long contexts).
template <int64_t kD, typename KT>
inline float dot(const float* a, const KT* b, int64_t D) {
  if constexpr (kVectorized<kD>) {
    auto acc = Vec::zero();
    for (int64_t d = 0; d < kD; d += Vec::kLanes) acc = Vec::fma(Vec::load(a + d), Vec::widen(b + d), acc);
    return Vec::sum(acc);
  } else {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += a[d] * widen(b[d]);
    return acc;
  }
}

// The largest of x[0:n] (n >= 1; NaNs after the first element are passed over, as std::max(mx, x) did).
// GCC does not vectorize a float max reduction (`omp simd reduction(max)` over std::max compiled to a
// scalar chain, ~4 cycles an element); this keeps kLanes running maxima, which it does vectorize.
inline float row_max(const float* x, int64_t n) {
  constexpr int64_t kLanes = 32;
  float m[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) m[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  float mx = x[0];
  for (int64_t j = 0; j < kLanes; ++j) mx = m[j] > mx ? m[j] : mx;
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  return mx;
}

// exp(x) for x <= 0 (softmax after subtracting the max), in plain arithmetic so that a loop of
// it vectorizes: exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], exp(r) by the Cephes
// polynomial (relative error ~2e-7, about std::exp's float rounding). Below -87.3 it returns
// exp(-87.3) ~ 1e-38 instead of a smaller number: nothing against the max's weight of 1.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for an exact n * ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out[0:D] = inv * sum_k w[k] * V_k over keys 0..n_keys-1 of one kv head, read through the block
// table (vc: fp32, or bf16 bits). With kD fixed and vectorized the sum stays in vector registers for
// the whole pass.
template <int64_t kD, typename KT>
void weighted_values(const float* w, const KT* vc, const int64_t* bt, int64_t n_keys, int64_t bs,
                     int64_t stride_block, int64_t stride_pos, int64_t head_dim, float inv, float* out) {
  auto each_key = [&](auto&& add) {  // add(weight, value row) for every key, block by block
    for (int64_t k0 = 0, blk = 0; k0 < n_keys; k0 += bs, ++blk) {
      const KT* values = vc + bt[blk] * stride_block;
      const int64_t n = std::min(bs, n_keys - k0);
      for (int64_t t = 0; t < n; ++t) add(w[k0 + t], values + t * stride_pos);
    }
  };
  if constexpr (kVectorized<kD>) {
    constexpr int64_t R = kD / Vec::kLanes;
    typename Vec::T acc[R];
    for (int64_t r = 0; r < R; ++r) acc[r] = Vec::zero();
    each_key([&](float weight, const KT* val) {
      const auto wt = Vec::broadcast(weight);
      for (int64_t r = 0; r < R; ++r) acc[r] = Vec::fma(wt, Vec::widen(val + r * Vec::kLanes), acc[r]);
    });
    for (int64_t r = 0; r < R; ++r) Vec::store(out + r * Vec::kLanes, Vec::mul(acc[r], Vec::broadcast(inv)));
  } else {
    for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.f;
    each_key([&](float weight, const KT* val) {
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * widen(val[d]);
    });
    for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
  }
}

// One row's attention for the G query heads that share one kv head: q (G, D) against keys
// 0..n_keys-1, read through the block table (kc and vc point at this kv head's slice of the
// layer's cache: fp32, or bf16 bits); writes out (G, D). scores is scratch for G * n_keys floats.
template <int64_t kD, typename KT>
void attend_group(const float* q, const KT* kc, const KT* vc, const int64_t* bt, int64_t n_keys, int64_t bs,
                  int64_t stride_block, int64_t stride_pos, int64_t G, int64_t head_dim, float scale, float* scores,
                  float* out) {
  const int64_t D = kD > 0 ? kD : head_dim;
  for (int64_t k0 = 0, blk = 0; k0 < n_keys; k0 += bs, ++blk) {
    const KT* keys = kc + bt[blk] * stride_block;
    const int64_t n = std::min(bs, n_keys - k0);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < G; ++j) {
        scores[j * n_keys + k0 + t] = dot<kD, KT>(q + j * D, keys + t * stride_pos, D) * scale;
      }
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    float* sj = scores + j * n_keys;
    const float mx = row_max(sj, n_keys);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < n_keys; ++k) {
      sj[k] = exp_nonpositive(sj[k] - mx);
      sum += sj[k];
    }
    weighted_values<kD, KT>(sj, vc, bt, n_keys, bs, stride_block, stride_pos, D, 1.f / sum, out + j * D);
  }
}

const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

}  // namespace

// tokens, positions (B,) int64; block_table (B, W) int64; cache (n_layer, num_blocks, block_size, Hkv, D)
// contiguous, fp32 or bf16 (an opt-in cache of half the bytes: keys and values are rounded to bf16 as they
// are written and widened exactly as they are read, so the math stays fp32); weights: per layer [norm1_gain,
// norm1_shift, qkv_w, qkv_b, proj_w, proj_b, norm2_gain, norm2_shift, up_w, up_b, down_w, down_b], then
// [embed, pos_embed, rope_cos, rope_sin, norm_gain, norm_shift, head_w, head_b]; an empty tensor means
// absent (no bias, no gain). The linear weights (*_w) are packed in tiles (see `linear`), all fp32, all bf16
// or all int8; everything else is fp32. With int8 tiles, 4 * n_layer + 1 more tensors follow: each matrix's
// fp32 row scales (O,), per layer qkv, proj, up, down, then the head.
// dims = [H, Hkv, D, d_model, d_ff, rms, swiglu, V], and a ninth, qk_norm: when 1, 2 * n_layer more fp32 (D,)
// tensors come last, each layer's query and key head gains (Qwen3's RMSNorm of every head before rotary).
// Returns logits (B, V).
torch::Tensor decode_step(torch::Tensor tokens, torch::Tensor positions, torch::Tensor block_table,
                          torch::Tensor k_cache, torch::Tensor v_cache, std::vector<torch::Tensor> weights,
                          std::vector<int64_t> dims, double eps) {
  TORCH_CHECK(dims.size() == 8 || dims.size() == 9, "dims must be [H, Hkv, D, d_model, d_ff, rms, swiglu, vocab] "
              "and optionally qk_norm");
  const int64_t H = dims[0], Hkv = dims[1], D = dims[2], dm = dims[3], dff = dims[4];
  TORCH_CHECK(dims[7] > 0, "vocab must be > 0");
  const bool rms = dims[5] != 0, swiglu = dims[6] != 0, qk_norm = dims.size() == 9 && dims[8] != 0;
  const int64_t L = k_cache.size(0), bs = k_cache.size(2);
  const int64_t B = tokens.size(0), W = block_table.size(1);
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64 &&
                  block_table.scalar_type() == torch::kInt64,
              "tokens, positions and block_table must be int64");
  TORCH_CHECK(tokens.is_contiguous() && positions.is_contiguous() && block_table.is_contiguous() &&
                  positions.size(0) == B && block_table.size(0) == B,
              "tokens (B,), positions (B,), block_table (B, W) must be contiguous");
  const bool bf16_cache = k_cache.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16_cache || k_cache.scalar_type() == torch::kFloat32) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 5 &&
                  k_cache.size(3) == Hkv && k_cache.size(4) == D,
              "the caches must be contiguous (n_layer, num_blocks, block_size, Hkv, D), both fp32 or both bf16");
  // with qk_norm, the last 2 * L tensors are each layer's query and key head gains (D,)
  const int64_t n_weights = static_cast<int64_t>(weights.size()) - (qk_norm ? 2 * L : 0);
  TORCH_CHECK(n_weights == 12 * L + 8 || n_weights == 16 * L + 9, "expected ", 12 * L + 8, " weight tensors (",
              16 * L + 9, " with int8 matrices), plus ", 2 * L, " with qk_norm");
  const auto packed_type = weights[12 * L + 6].scalar_type();  // the head's
  const bool quantized = n_weights == 16 * L + 9;
  for (int64_t i = n_weights; i < static_cast<int64_t>(weights.size()); ++i) {
    TORCH_CHECK(weights[i].scalar_type() == torch::kFloat32 && weights[i].is_contiguous() &&
                    weights[i].sizes() == at::IntArrayRef({D}),
                "qk_norm gains must be fp32 contiguous (D,)");
  }
  TORCH_CHECK(quantized ? packed_type == torch::kChar : packed_type == torch::kFloat32 ||
                                                            packed_type == torch::kBFloat16,
              "packed weights must be fp32 or bf16, or int8 followed by their scales");
  for (int64_t i = 0; i < 12 * L + 8; ++i) {
    const auto& w = weights[i];
    const int64_t k = i < 12 * L ? i % 12 : i - 12 * L;
    const bool packed = i < 12 * L ? (k == 2 || k == 4 || k == 8 || k == 10) : k == 6;
    TORCH_CHECK(!w.numel() || (w.scalar_type() == (packed ? packed_type : torch::kFloat32) && w.is_contiguous()),
                "weights must be contiguous, fp32 (the packed matrices: all fp32, all bf16 or all int8)");
  }
  // the int8 matrices' row scales, or null: scales[4 * l + k] for layer l's qkv, proj, up, down; scales[4 * L] head
  auto scale_of = [&](int64_t m) -> const float* {
    return quantized ? weights[12 * L + 8 + m].data_ptr<float>() : nullptr;
  };
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && D > 0 && D <= 1024 && D % 2 == 0,
              "need H a multiple of Hkv and an even head dim <= 1024");
  const int64_t G = H / Hkv, qkv_dim = (H + 2 * Hkv) * D, up_dim = swiglu ? 2 * dff : dff;
  const torch::Tensor* tail = &weights[12 * L];
  const auto& embed = tail[0];
  const auto& pos_embed = tail[1];
  const auto& rope_cos = tail[2];
  const auto& rope_sin = tail[3];
  const auto& head_w = tail[6];
  const int64_t V = dims[7];
  auto check_shape = [](const torch::Tensor& t, std::vector<int64_t> want, const char* what) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), what, " has shape ", t.sizes(), ", expected ", want);
  };
  auto tiles = [](int64_t O) { return (O + kTile - 1) / kTile; };  // packed weights: (tiles, I, kTile)
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &weights[12 * l];
    check_shape(lw[2], {tiles(qkv_dim), dm, kTile}, "qkv weight");
    check_shape(lw[4], {tiles(dm), H * D, kTile}, "proj weight");
    check_shape(lw[8], {tiles(up_dim), dm, kTile}, "up weight");
    check_shape(lw[10], {tiles(dm), dff, kTile}, "down weight");
    const int64_t vector_sizes[8] = {dm, dm, qkv_dim, dm, dm, dm, up_dim, dm};  // gains, shifts and biases
    const int vectors[8] = {0, 1, 3, 5, 6, 7, 9, 11};
    for (int i = 0; i < 8; ++i) {
      if (lw[vectors[i]].numel()) check_shape(lw[vectors[i]], {vector_sizes[i]}, "norm gain, shift or bias");
    }
  }
  for (int i = 4; i < 6; ++i) {
    if (tail[i].numel()) check_shape(tail[i], {dm}, "final norm gain or shift");
  }
  TORCH_CHECK(embed.dim() == 2 && embed.size(1) == dm, "embedding must be (vocab, d_model)");
  TORCH_CHECK(!pos_embed.numel() || (pos_embed.dim() == 2 && pos_embed.size(1) == dm),
              "position embedding must be (max_seq_len, d_model)");
  TORCH_CHECK(rope_cos.numel() || pos_embed.numel(), "need rope tables or a position embedding");
  check_shape(head_w, {tiles(V), dm, kTile}, "head weight");
  if (tail[7].numel()) check_shape(tail[7], {V}, "head bias");
  if (quantized) {
    const int64_t rows[4] = {qkv_dim, dm, up_dim, dm};
    for (int64_t m = 0; m <= 4 * L; ++m) {
      const auto& s = weights[12 * L + 8 + m];
      TORCH_CHECK(s.scalar_type() == torch::kFloat32 && s.is_contiguous(), "int8 scales must be fp32 contiguous");
      check_shape(s, {m < 4 * L ? rows[m % 4] : V}, "int8 row scales");
    }
  }
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(1);
  const int64_t max_pos = rope_cos.numel() ? rope_cos.size(0) : pos_embed.size(0);  // rows of the position tables
  TORCH_CHECK(!rope_cos.numel() || (rope_cos.sizes() == rope_sin.sizes() && rope_cos.size(1) == D),
              "rope tables must be (max_seq_len, D)");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tok[b] >= 0 && tok[b] < embed.size(0), "token id out of range");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < max_pos, "position past the model's context");
    TORCH_CHECK(pos[b] < W * bs, "position past the block table");
    for (int64_t j = 0; j <= pos[b] / bs; ++j) {
      TORCH_CHECK(table[b * W + j] >= 0 && table[b * W + j] < num_blocks, "block id out of range");
    }
  }

  std::vector<float> x(B * dm), n(B * dm), qkv(B * qkv_dim), att(B * H * D), tmp(B * dm), h(B * up_dim),
      act(B * dff);
  for (int64_t b = 0; b < B; ++b) {
    const float* e = embed.data_ptr<float>() + tok[b] * dm;
    const float* pe = pos_embed.numel() ? pos_embed.data_ptr<float>() + pos[b] * dm : nullptr;
    for (int64_t i = 0; i < dm; ++i) x[b * dm + i] = pe ? e[i] + pe[i] : e[i];
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t stride_pos = Hkv * D, stride_block = bs * stride_pos, stride_layer = num_blocks * stride_block;
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &weights[12 * l];
    normalize(x.data(), n.data(), B, dm, rms, static_cast<float>(eps), opt(lw[0]), opt(lw[1]));
    linear(lw[2], scale_of(4 * l), opt(lw[3]), n.data(), qkv.data(), B, qkv_dim, dm);
    for (int64_t b = 0; b < B; ++b) {  // rotary embedding of the queries and keys
      float* row = qkv.data() + b * qkv_dim;
      if (qk_norm) {  // each query and key head RMS-normalized first, with its kind's gain
        const float* gains[2] = {weights[n_weights + 2 * l].data_ptr<float>(),
                                 weights[n_weights + 2 * l + 1].data_ptr<float>()};
        for (int64_t hh = 0; hh < H + Hkv; ++hh) {
          normalize(row + hh * D, row + hh * D, 1, D, true, static_cast<float>(eps), gains[hh >= H], nullptr);
        }
      }
      if (rope_cos.numel()) {  // x * cos + roll(x, D/2) * signed_sin
        const float* c = rope_cos.data_ptr<float>() + pos[b] * D;
        const float* s = rope_sin.data_ptr<float>() + pos[b] * D;
        float rotated[1024];
        for (int64_t hh = 0; hh < H + Hkv; ++hh) {
          float* v = row + hh * D;
          for (int64_t d = 0; d < D; ++d) rotated[d] = v[d] * c[d] + v[(d + D / 2) % D] * s[d];
          for (int64_t d = 0; d < D; ++d) v[d] = rotated[d];
        }
      }
    }
    // the cache write, then attention of each query head over keys 0..p of its row, one (row, kv head)
    // pair -- the kv head's group of query heads -- per work item, so that one long row also spreads over
    // the threads (at long contexts the cache it reads outweighs the weights); KT is the cache's element
    auto write_and_attend = [&](auto* kc, auto* vc) {
      using KT = std::remove_pointer_t<decltype(kc)>;
      for (int64_t b = 0; b < B; ++b) {
        const float* row = qkv.data() + b * qkv_dim;
        const int64_t p = pos[b];
        const int64_t slot = table[b * W + p / bs] * stride_block + (p % bs) * stride_pos;
        for (int64_t i = 0; i < Hkv * D; ++i) {
          kc[slot + i] = narrow<KT>(row[H * D + i]);
          vc[slot + i] = narrow<KT>(row[(H + Hkv) * D + i]);
        }
      }
      const auto attend = D == 32 ? attend_group<32, KT> : D == 64 ? attend_group<64, KT>
                        : D == 128 ? attend_group<128, KT> : attend_group<0, KT>;
      auto attend_items = [&](int64_t i0, int64_t i1) {
        std::vector<float> scores;
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t b = item / Hkv, g = item % Hkv;
          const int64_t n_keys = pos[b] + 1;
          scores.resize(G * n_keys);
          attend(qkv.data() + b * qkv_dim + g * G * D, kc + g * D, vc + g * D, table + b * W, n_keys, bs,
                 stride_block, stride_pos, G, D, scale, scores.data(), att.data() + (b * H + g * G) * D);
        }
      };
      int64_t work = 0;  // multiply-adds of this layer's attention
      for (int64_t b = 0; b < B; ++b) work += (pos[b] + 1) * 2 * H * D;
      if (B * Hkv > 1 && work >= kParallelMacs) {
        at::parallel_for(0, B * Hkv, 1, attend_items);
      } else {
        attend_items(0, B * Hkv);
      }
    };
    if (bf16_cache) {
      write_and_attend(reinterpret_cast<uint16_t*>(k_cache.data_ptr<at::BFloat16>()) + l * stride_layer,
                       reinterpret_cast<uint16_t*>(v_cache.data_ptr<at::BFloat16>()) + l * stride_layer);
    } else {
      write_and_attend(k_cache.data_ptr<float>() + l * stride_layer, v_cache.data_ptr<float>() + l * stride_layer);
    }
    linear(lw[4], scale_of(4 * l + 1), opt(lw[5]), att.data(), tmp.data(), B, dm, H * D);
    for (int64_t i = 0; i < B * dm; ++i) x[i] += tmp[i];
    normalize(x.data(), n.data(), B, dm, rms, static_cast<float>(eps), opt(lw[6]), opt(lw[7]));
    linear(lw[8], scale_of(4 * l + 2), opt(lw[9]), n.data(), h.data(), B, up_dim, dm);
    for (int64_t b = 0; b < B; ++b) {
      const float* hb = h.data() + b * up_dim;
      float* ab = act.data() + b * dff;
      if (swiglu) {  // silu(gate) * up, the weight stores [gate; up]
        for (int64_t i = 0; i < dff; ++i) ab[i] = hb[i] / (1.f + std::exp(-hb[i])) * hb[dff + i];
      } else {  // GELU, tanh approximation (GPT-2)
        for (int64_t i = 0; i < dff; ++i) {
          const float v = hb[i];
          ab[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        }
      }
    }
    linear(lw[10], scale_of(4 * l + 3), opt(lw[11]), act.data(), tmp.data(), B, dm, dff);
    for (int64_t i = 0; i < B * dm; ++i) x[i] += tmp[i];
  }
  normalize(x.data(), n.data(), B, dm, rms, static_cast<float>(eps), opt(tail[4]), opt(tail[5]));
  auto logits = torch::empty({B, V}, torch::dtype(torch::kFloat32));
  linear(head_w, scale_of(4 * L), opt(tail[7]), n.data(), logits.data_ptr<float>(), B, V, dm);
  return logits;
}

// ---- sampling -------------------------------------------------------------------------------
// One id per row of fp32 logits (B, V), the same draw as model/sampling.py's torch path in one
// call instead of ~30 small ops: rows with temperature below `greedy_below` take the argmax
// (first of equal maxima, as torch.argmax); the others weight token i by exp((x_i - max) / T),
// keep the row's top-k and then the top-p nucleus of those (the smallest set of the largest
// weights whose mass, under the top-k-restricted distribution, reaches p), and return the first
// kept id whose running sum of kept weights passes u * total, u from `uniforms` (drawn by the
// caller, so a seeded row keeps its own torch.Generator). Weights more than 87 nats under the
// max count as 0, so -inf logits (banned ids, padding) are never drawn.
//
// The top-k / top-p cut looks at the largest weights only. A few vectorized passes count the
// weights (and their mass) above fixed cuts, from the highest down, until one cut leaves at least k
// ids or slightly more than the nucleus's mass; only the ids above it are collected, and of those
// nth_element picks the top K (K = k, or 64 for a nucleus alone, then 8x wider while the nucleus
// does not end inside the window), and only those K are sorted. Ids tying the smallest kept weight
// are all kept.
constexpr float kCuts[] = {1.f, 0.36787944f, 0.13533528f, 4.9787068e-2f, 1.1108997e-2f, 2.4787522e-3f,
                           3.3546263e-4f, 1.6701700e-5f, 3.0590232e-7f, 2.0611537e-9f, 1e-38f};  // e^-{0,1,2,3,4.5,6,8,11,15,20}

void sample_row(const float* x, int64_t V, float temperature, int64_t top_k, float top_p, float u,
                float greedy_below, int64_t* out) {
  // (the `omp simd` sum reductions let those loops vectorize: a float sum is not reassociated otherwise;
  // a NaN logit is not handled, as the torch path does not either)
  const float mx = row_max(x, V);
  auto first_max = [&] {
    for (int64_t i = 0; i < V; ++i)
      if (x[i] == mx) return i;
    return int64_t{0};  // an all-NaN row
  };
  if (temperature < greedy_below || !std::isfinite(mx)) {
    *out = first_max();  // (an all -inf row: id 0, as torch.argmax gives)
    return;
  }
  const float inv = 1.f / temperature;
  std::vector<float> w(static_cast<size_t>(V));
  float* wp = w.data();
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < V; ++i) {
    const float d = (x[i] - mx) * inv;
    wp[i] = d > -87.f ? exp_nonpositive(d) : 0.f;
    z += wp[i];
  }
  float threshold = 0.f;  // kept: weight >= threshold (and > 0)
  const bool cut_k = top_k > 0 && top_k < V;
  const bool cut_p = top_p < 1.f;
  if (cut_k || cut_p) {
    const float want_mass = std::min(1.f, top_p + 1e-3f) * z;  // a margin for rounding: a superset is fine
    float cut = kCuts[std::size(kCuts) - 1];
    for (float c : kCuts) {
      int64_t count = 0;
      float mass = 0.f;
#pragma omp simd reduction(+ : count, mass)
      for (int64_t i = 0; i < V; ++i) {
        const bool above = wp[i] >= c;
        count += above;
        mass += above ? wp[i] : 0.f;
      }
      if (cut_k ? count >= top_k : mass >= want_mass) {
        cut = c;
        break;
      }
    }
    std::vector<float> top;
    for (int64_t i = 0; i < V; ++i)
      if (wp[i] >= cut) top.push_back(wp[i]);
    const int64_t n = static_cast<int64_t>(top.size());
    const int64_t limit = cut_k ? std::min(top_k, n) : n;  // the nucleus lies within the top-k
    int64_t K = cut_k ? limit : std::min<int64_t>(64, n), sorted = 0;
    double norm = 0.0;  // the top-k-restricted distribution's normalizer
    if (cut_k) {
      std::nth_element(top.begin(), top.begin() + (K - 1), top.end(), std::greater<float>());
      for (int64_t j = 0; j < K; ++j) norm += top[j];
    } else {
      norm = z;
    }
    int64_t keep = limit;
    double before = 0.0;  // mass of the window's sorted prefix, as a fraction of norm
    const double p = cut_p ? static_cast<double>(top_p) : 2.0;
    for (;;) {
      if (!cut_k && K < n)
        std::nth_element(top.begin() + sorted, top.begin() + (K - 1), top.end(), std::greater<float>());
      std::sort(top.begin() + sorted, top.begin() + K, std::greater<float>());
      int64_t j = sorted;
      for (; j < K; ++j) {
        if (j > 0 && before >= p) break;  // the mass before id j already reaches top_p
        before += top[j] / norm;
      }
      if (j < K || K >= limit) {
        keep = j;
        break;
      }
      sorted = K;
      K = std::min<int64_t>(limit, 8 * K);
    }
    threshold = top[keep - 1];
  }
  // the kept mass in blocks of 256 ids (vectorized), then the block where the running sum passes
  // u * total, id by id
  constexpr int64_t kBlock = 256;
  const int64_t n_blocks = (V + kBlock - 1) / kBlock;
  std::vector<double> block_mass(static_cast<size_t>(n_blocks));
  double total = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    float m = 0.f;
    const int64_t hi = std::min(V, (b + 1) * kBlock);
#pragma omp simd reduction(+ : m)
    for (int64_t i = b * kBlock; i < hi; ++i) m += wp[i] >= threshold ? wp[i] : 0.f;
    block_mass[b] = m;
    total += m;
  }
  const double target = static_cast<double>(u) * total;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (block_mass[b] == 0.0) continue;
    if (run + block_mass[b] <= target && b + 1 < n_blocks) {
      run += block_mass[b];
      continue;
    }
    const int64_t hi = std::min(V, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < hi; ++i) {
      if (wp[i] > 0.f && wp[i] >= threshold) {
        run += wp[i];
        last = i;
        if (run > target) {
          *out = i;
          return;
        }
      }
    }
  }
  *out = last >= 0 ? last : first_max();  // u * total rounded up to the whole sum: the last kept id
}

torch::Tensor sample_rows(torch::Tensor logits, std::vector<double> temperature, std::vector<int64_t> top_k,
                          std::vector<double> top_p, torch::Tensor uniforms, int64_t vocab_limit,
                          double greedy_below) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
              "sample_rows: logits must be a 2-D fp32 CPU tensor");
  logits = logits.contiguous();
  const int64_t B = logits.size(0), V = std::min(logits.size(1), vocab_limit);
  TORCH_CHECK(V > 0, "sample_rows: no vocabulary");
  TORCH_CHECK(static_cast<int64_t>(temperature.size()) == B && static_cast<int64_t>(top_k.size()) == B &&
                  static_cast<int64_t>(top_p.size()) == B,
              "sample_rows: one temperature, top_k and top_p per row");
  auto u = uniforms.to(torch::kFloat32).contiguous().view({-1});
  TORCH_CHECK(u.numel() == B, "sample_rows: one uniform per row");
  auto ids = torch::empty({B}, logits.options().dtype(torch::kInt64));
  const float* x = logits.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
  const int64_t row_stride = logits.size(1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      sample_row(x + b * row_stride, V, static_cast<float>(temperature[b]), top_k[b], static_cast<float>(top_p[b]),
                 up[b], static_cast<float>(greedy_below), out + b);
  });
  return ids;
}

// ----------------------------------------------------------------------------- the CPU forward's
// elementwise steps. A prompt's or a scoring window's forward (many rows) multiplies through oneDNN, but
// the steps between the products ran as several torch ops each (RMSNorm alone: a cast, pow, mean, add,
// rsqrt and two multiplies), each a pass over the (rows, width) activations. These do each step in one
// pass, rows split over torch's intra-op threads. fp32 only; model/transformer.py uses them for
// inference without autograd (`Transformer.cpu_ops`).

// GCC vectorizes plain loops 256 bits wide by default even where AVX-512 is there (-march=native on
// Sapphire Rapids); the exp-heavy row loops below run ~2x faster 512 bits wide.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define KILN_WIDE_LOOPS __attribute__((target("prefer-vector-width=512")))
#else
#define KILN_WIDE_LOOPS
#endif

namespace {

constexpr int64_t kElementwiseGrain = 1 << 14;  // floats per thread chunk, at least

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, width)); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous 2-D fp32 CPU tensor");
}

// sigmoid(x) * x for any x, through exp of a non-positive number (so it vectorizes): with
// t = exp(-|x|), sigmoid(x) = 1 / (1 + t) for x >= 0 and t / (1 + t) below.
inline float silu(float x) {
  const float t = exp_nonpositive(-std::fabs(x));
  const float sig = (x >= 0.f ? 1.f : t) / (1.f + t);
  return x * sig;
}

KILN_WIDE_LOOPS void silu_mul_row(const float* g, float* o, int64_t F) {
#pragma omp simd
  for (int64_t i = 0; i < F; ++i) o[i] = silu(g[i]) * g[F + i];
}

// The log-sum-exp of row[0:V].
KILN_WIDE_LOOPS float log_sum_exp(const float* row, int64_t V) {
  const float mx = row_max(row, V);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) sum += exp_nonpositive(row[v] - mx);
  return mx + std::log(sum);
}

// row[0:V] := (exp(row - lse) - [v == target]) * scale (target -1: none), in place.
KILN_WIDE_LOOPS void softmax_grad_row(float* row, int64_t V, float lse, float scale, int64_t target) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) row[v] = exp_nonpositive(row[v] - lse) * scale;
  if (target >= 0) row[target] -= scale;
}

}  // namespace

// h (N, d) += residual (when given), in place: h becomes the new residual stream; returns norm(h):
// RMSNorm or LayerNorm times the gain, plus the shift when given (empty tensors: absent).
torch::Tensor add_norm(torch::Tensor h, torch::Tensor residual, torch::Tensor gain, torch::Tensor shift, bool rms,
                       double eps) {
  check_rows(h, "add_norm: h");
  const int64_t N = h.size(0), d = h.size(1);
  if (residual.numel()) {
    check_rows(residual, "add_norm: residual");
    TORCH_CHECK(residual.sizes() == h.sizes(), "add_norm: residual and h must have one shape");
  }
  for (const auto* t : {&gain, &shift}) {
    TORCH_CHECK(!t->numel() || (t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == d),
                "add_norm: gain and shift must be empty or (d,) contiguous fp32");
  }
  auto out = torch::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* rp = residual.numel() ? residual.data_ptr<float>() : nullptr;
  const float* gp = opt(gain);
  const float* sp = opt(shift);
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, row_grain(d), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row = hp + n * d;
      if (rp) {
        const float* r = rp + n * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) row[i] += r[i];
      }
      normalize(row, op + n * d, 1, d, rms, e, gp, sp);
    }
  });
  return out;
}

// Rotary embedding in place on the first n_heads heads (queries and keys) of each row of x (N, C),
// head i at columns [i * D, (i + 1) * D); row n at position positions[n]: x * cos + roll(x, D/2) * sin
// with the sign folded into the sin table (model/transformer.py `rope_tables`, (max_pos, D)).
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, int64_t n_heads,
           int64_t D) {
  check_rows(x, "rope_: x");
  check_rows(cos, "rope_: cos");
  check_rows(sin, "rope_: sin");
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == torch::kInt64 && positions.dim() == 1 &&
                  positions.is_contiguous() && positions.numel() == x.size(0),
              "rope_: positions must be (N,) contiguous int64");
  TORCH_CHECK(D > 0 && D % 2 == 0 && n_heads >= 0 && n_heads * D <= x.size(1), "rope_: bad heads or head dim");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) == D, "rope_: tables must be (max_pos, D)");
  const int64_t N = x.size(0), C = x.size(1), max_pos = cos.size(0), half = D / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(pos[n] >= 0 && pos[n] < max_pos, "rope_: position out of range");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, N, row_grain(n_heads * D), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* c = cp + pos[n] * D;
      const float* s = sp + pos[n] * D;
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = xp + n * C + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] + b * s[i];
          v[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// SwiGLU: x (N, 2F) holding [gate; up] per row -> silu(gate) * up (N, F).
torch::Tensor silu_mul(torch::Tensor x) {
  check_rows(x, "silu_mul: x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul: x must have an even width");
  const int64_t N = x.size(0), F = x.size(1) / 2;
  auto out = torch::empty({N, F}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, row_grain(2 * F), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) silu_mul_row(xp + n * 2 * F, op + n * F, F);
  });
  return out;
}

// ----------------------------------------------------------------------------- fp32 products on AMX tiles
// A prompt's or scoring window's forward spends most of its time in fp32 matrix products, which these
// CPUs run at ~280 GFLOP/s; their AMX tiles multiply bf16 matrices several times faster, accumulating in
// fp32. When a weight is exactly a bf16 number (checkpoints stored in bf16, as the default model is), an
// fp32 product needs no rounding of the weight: splitting each activation x into bf16 parts,
// x = x1 + x2 + x3 + r with |r| <= 2^-24 |x| about, gives x . w = x1 . w + x2 . w + x3 . w to fp32's own
// precision (each part times a bf16 weight is exact in fp32; the sums are fp32). `amx_linear` runs those
// parts through torch's oneDNN micro-kernel (at::native::cpublas::brgemm) over tiles of kAmxRows rows x
// kAmxCols outputs, with the weight packed once (`amx_pack`). model/cpu_packing.py `amx_linears` decides
// where it applies.

namespace {

constexpr int64_t kAmxRows = 128;  // rows per micro-kernel call (the fastest of 32-512 here)
constexpr int64_t kAmxCols = 64;   // outputs per packed block (128 does not pack)

inline uint16_t bf16_bits(float f) {  // round to nearest even (finite inputs)
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float bf16_value(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// x[0:n] into `parts` bf16 arrays of n, each the rounding of what the parts before it left over.
KILN_WIDE_LOOPS void split_bf16(const float* x, int64_t n, int64_t parts, uint16_t* const* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float rest = x[i];
    for (int64_t p = 0; p < parts; ++p) {
      const uint16_t h = bf16_bits(rest);
      out[p][i] = h;
      rest -= bf16_value(h);
    }
  }
}

}  // namespace

bool amx_ready() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

// W (O, K) fp32, every element a bf16 number, K even -> (ceil(O / kAmxCols), K * kAmxCols) bf16: W^T in
// blocks of kAmxCols outputs, each in the micro-kernel's VNNI layout.
torch::Tensor amx_pack(torch::Tensor W) {
  TORCH_CHECK(amx_ready(), "amx_pack: this build or CPU has no bf16 micro-kernel");
  TORCH_CHECK(W.device().is_cpu() && W.scalar_type() == torch::kFloat32 && W.dim() == 2,
              "amx_pack: W must be a 2-D fp32 CPU tensor");
  const int64_t O = W.size(0), K = W.size(1), blocks = (O + kAmxCols - 1) / kAmxCols;
  TORCH_CHECK(K % 2 == 0 && K > 0 && O > 0, "amx_pack: K must be even and both sizes positive");
  auto wt = torch::zeros({K, blocks * kAmxCols}, W.options().dtype(torch::kBFloat16));
  wt.narrow(1, 0, O).copy_(W.t());
  auto out = torch::empty({blocks, K * kAmxCols}, wt.options());
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  for (int64_t j = 0; j < blocks; ++j)
    at::native::cpublas::pack(K, kAmxCols, blocks * kAmxCols, kAmxCols, at::kBFloat16, at::kBFloat16,
                              wt.data_ptr<at::BFloat16>() + j * kAmxCols,
                              out.data_ptr<at::BFloat16>() + j * K * kAmxCols);
#endif
  return out;
}

// x (N, K) fp32 contiguous times the packed weight of O outputs, each output times scale (an int8 layer's row
// scales, model/quantize.py; empty: none) plus bias ((O,) fp32 or empty) -> (N, O) fp32, through `parts` bf16
// parts of x (3: fp32's precision; fewer: faster, coarser).
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t O, int64_t parts,
                         torch::Tensor scale) {
  check_rows(x, "amx_linear: x");
  const int64_t N = x.size(0), K = x.size(1), blocks = (O + kAmxCols - 1) / kAmxCols;
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(0) == blocks && packed.size(1) == K * kAmxCols,
              "amx_linear: packed does not hold a (", O, ", ", K, ") weight from amx_pack");
  for (const auto* t : {&bias, &scale}) {
    TORCH_CHECK(!t->numel() || (t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == O),
                "amx_linear: bias and scale must be empty or (O,) fp32");
  }
  TORCH_CHECK(parts >= 1 && parts <= 3, "amx_linear: parts must be 1, 2 or 3");
  auto y = torch::empty({N, O}, x.options());
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (N == 0) return y;
  auto pieces = torch::empty({parts, N, K}, x.options().dtype(torch::kBFloat16));
  uint16_t* pp = reinterpret_cast<uint16_t*>(pieces.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    uint16_t* out[3];
    for (int64_t p = 0; p < parts; ++p) out[p] = pp + p * N * K + n0 * K;
    split_bf16(xp + n0 * K, (n1 - n0) * K, parts, out);
  });
  const auto* a = reinterpret_cast<const at::BFloat16*>(pp);
  const auto* w = packed.data_ptr<at::BFloat16>();
  const float* b = opt(bias);
  const float* sc = opt(scale);
  const bool bias_first = b != nullptr && sc == nullptr;  // C starts as the bias; scaled outputs add it last
  float* yp = y.data_ptr<float>();
  const int64_t row_blocks = (N + kAmxRows - 1) / kAmxRows;
  at::parallel_for(0, row_blocks * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tail;  // the last block of outputs when O is not a multiple of kAmxCols
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / blocks) * kAmxRows, j = t % blocks, M = std::min(kAmxRows, N - r0);
      const int64_t c0 = j * kAmxCols, cols = std::min(kAmxCols, O - c0);
      float* c = yp + r0 * O + c0;
      int64_t ldc = O;
      if (cols < kAmxCols) {
        tail.assign(static_cast<size_t>(M * kAmxCols), 0.f);
        c = tail.data();
        ldc = kAmxCols;
      }
      if (bias_first) {
        for (int64_t m = 0; m < M; ++m) std::memcpy(c + m * ldc, b + c0, sizeof(float) * cols);
      }
      for (int64_t p = 0; p < parts; ++p)
        at::native::cpublas::brgemm(M, kAmxCols, K, K, kAmxCols, ldc, bias_first || p > 0,
                                    a + p * N * K + r0 * K, w + j * K * kAmxCols, c, true);
      if (sc) {
        for (int64_t m = 0; m < M; ++m) {
          float* row = c + m * ldc;
#pragma omp simd
          for (int64_t i = 0; i < cols; ++i) row[i] = row[i] * sc[c0 + i] + (b ? b[c0 + i] : 0.f);
        }
      }
      if (cols < kAmxCols) {
        for (int64_t m = 0; m < M; ++m) std::memcpy(yp + (r0 + m) * O + c0, c + m * ldc, sizeof(float) * cols);
      }
    }
    at::native::cpublas::brgemm_release();  // (the VNNI context: the default, and the only one older torches name)
  });
#else
  TORCH_CHECK(false, "amx_linear: this torch has no bf16 micro-kernel");
#endif
  return y;
}

// Per row of logits (N, >= V) over the first V columns: the log-probability of the row's target id and,
// when num_top > 0, the num_top largest log-probabilities with their ids (descending; equal values: lower
// id first). What scoring and echo need from the LM head's output, read in place: no (N, V) log-softmax
// table written, gathered from and searched again (model/scoring.py `chunked_logprobs`).
std::vector<torch::Tensor> token_logprobs(torch::Tensor logits, torch::Tensor targets, int64_t vocab_limit,
                                          int64_t num_top) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "token_logprobs: logits must be a 2-D fp32 CPU tensor with contiguous rows");
  const int64_t N = logits.size(0), V = std::min(logits.size(1), vocab_limit), row_stride = logits.stride(0);
  TORCH_CHECK(V > 0, "token_logprobs: no vocabulary");
  TORCH_CHECK(num_top >= 0 && num_top <= V, "token_logprobs: num_top must be in [0, V]");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == torch::kInt64 && targets.dim() == 1 &&
                  targets.numel() == N,
              "token_logprobs: targets must be (N,) int64");
  auto tg = targets.contiguous();
  const int64_t* t = tg.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(t[n] >= 0 && t[n] < V, "token_logprobs: target id out of range");
  auto lp = torch::empty({N}, logits.options());
  auto top_lp = torch::empty({N, num_top}, logits.options());
  auto top_ids = torch::empty({N, num_top}, tg.options());
  const float* x = logits.data_ptr<float>();
  float* out = lp.data_ptr<float>();
  float* tv = top_lp.data_ptr<float>();
  int64_t* ti = top_ids.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = x + n * row_stride;
      const float lse = log_sum_exp(row, V);
      out[n] = row[t[n]] - lse;
      if (num_top == 0) continue;
      float* vals = tv + n * num_top;  // kept sorted: vals[0] largest
      int64_t* ids = ti + n * num_top;
      int64_t kept = 0;
      for (int64_t v = 0; v < V; ++v) {
        const float value = row[v];
        if (kept == num_top && !(value > vals[kept - 1])) continue;  // ties keep the lower id
        int64_t i = kept < num_top ? kept++ : kept - 1;
        while (i > 0 && value > vals[i - 1]) {
          vals[i] = vals[i - 1];
          ids[i] = ids[i - 1];
          --i;
        }
        vals[i] = value;
        ids[i] = v;
      }
      for (int64_t i = 0; i < num_top; ++i) vals[i] -= lse;
    }
  });
  return {lp, top_lp, top_ids};
}

// One chunk of the training loss's rows on a CPU (kernels.cross_entropy's chunked LM head + cross-entropy):
// logits (n, V) fp32 or bf16 with contiguous rows, targets (n,) int64, row_scale (n,) fp32 (d loss / d row's
// loss). Returns each row's loss, log-sum-exp minus the target's logit (0 where the target is ignore_index),
// in fp32; with need_grad, overwrites the logits with their gradient, (softmax - one-hot at the target) *
// row_scale, in their own dtype. Each row is read twice and written once, in cache (a bf16 row is widened into
// a buffer first), where the torch ops made five passes over the whole chunk.
torch::Tensor loss_rows_(torch::Tensor logits, torch::Tensor targets, int64_t ignore_index, torch::Tensor row_scale,
                         bool need_grad) {
  const bool bf16 = logits.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(logits.device().is_cpu() && (bf16 || logits.scalar_type() == torch::kFloat32) && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "loss_rows_: logits must be a 2-D fp32 or bf16 CPU tensor with contiguous rows");
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == torch::kInt64 && targets.dim() == 1 &&
                  targets.numel() == N && row_scale.scalar_type() == torch::kFloat32 && row_scale.numel() == N,
              "loss_rows_: targets must be (n,) int64 and row_scale (n,) fp32");
  auto tg = targets.contiguous(), rs = row_scale.contiguous();
  const int64_t* t = tg.data_ptr<int64_t>();
  const float* scale = rs.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(t[n] == ignore_index || (t[n] >= 0 && t[n] < V), "loss_rows_: target ", t[n], " of row ", n,
                " is out of range [0, ", V, ")");
  auto loss = torch::empty({N}, logits.options().dtype(torch::kFloat32));
  float* lp = loss.data_ptr<float>();
  if (N == 0 || V == 0) return loss;
  float* xf = bf16 ? nullptr : logits.data_ptr<float>();
  at::BFloat16* xb = bf16 ? logits.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(bf16 ? V : 0);
    for (int64_t n = n0; n < n1; ++n) {
      float* row = bf16 ? buf.data() : xf + n * row_stride;
      if (bf16) {
        const at::BFloat16* src = xb + n * row_stride;
        for (int64_t v = 0; v < V; ++v) row[v] = static_cast<float>(src[v]);
      }
      const float lse = log_sum_exp(row, V);
      const bool valid = t[n] != ignore_index;
      lp[n] = valid ? lse - row[t[n]] : 0.f;
      if (!need_grad) continue;
      softmax_grad_row(row, V, lse, scale[n], valid ? t[n] : -1);
      if (bf16) {
        at::BFloat16* dst = xb + n * row_stride;
        for (int64_t v = 0; v < V; ++v) dst[v] = static_cast<at::BFloat16>(row[v]);
      }
    }
  });
  return loss;
}

// ----------------------------------------------------------------------------- causal attention of the CPU forward
// A prompt's or scoring window's attention. torch's CPU flash attention (SDPA) takes key blocks of 512,
// so up to 512 keys a causal call costs what a full one does, and each query head reads its keys on its
// own. Here a task takes kAttnRows query rows: kAttnRows / G positions (at least 8) of all G query heads that
// share one kv head, stacked, so one matrix product scores them all against that head's keys, and only the
// keys its last position sees are read. Keys go in chunks of kKeyChunk with an online softmax (flash attention's
// running max and sum), the products through torch's micro-kernel (cpublas::brgemm); tasks are handed
// to threads heaviest first. Keys and values are first copied per kv head into zero-padded buffers (keys
// transposed, in chunks), so the products come in a few shapes (their kernels are compiled once per shape
// and thread) and read nothing past the buffers.
//
// The products run in the inputs' precision with fp32 sums: fp32 (prompts and scoring, and fp32 training), or
// bf16 (training under bf16 autocast, as flash attention runs on a GPU: the weights P and the score gradients
// dS rounded to bf16 for the products that take them; softmax, log-sum-exp and every sum in fp32). The bf16
// micro-kernel (AVX-512 BF16 or AMX) runs ~2x the fp32 one on CPUs that have the instructions; it reads each
// B operand with pairs of rows interleaved (VNNI), which the buffers here are built in (`b_index`).

#if defined(CPUBLAS_BRGEMM_F32F32F32)
namespace {

constexpr int64_t kAttnRows = 128;  // query rows (positions x heads of a group) per task
constexpr int64_t kKeyChunk = 512;  // keys per product
constexpr int64_t kKeyPad = 64;     // key counts are rounded up to this (8 shapes of product per row count)

template <typename T>
constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;

// where element (k, n) of a (K, N) B operand with row stride ldb is held: row-major for fp32, and for bf16 in
// VNNI pairs (rows k and k + 1 interleaved, K even), the layout the bf16 micro-kernel reads
template <typename T>
inline int64_t b_index(int64_t k, int64_t n, int64_t ldb) {
  if constexpr (kBf16<T>) {
    return (k >> 1) * ldb * 2 + n * 2 + (k & 1);
  } else {
    return k * ldb + n;
  }
}

template <typename T>
inline T narrow_to(float x) {  // an fp32 number as T (bf16: rounded to nearest even)
  if constexpr (kBf16<T>) {
    return c10::BFloat16(bf16_bits(x), c10::BFloat16::from_bits());
  } else {
    return x;
  }
}

// C (M, N) (+)= A (M, K) B (K, N), fp32 sums; bf16 B in VNNI pairs
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* A,
                 const float* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const at::BFloat16* A, const at::BFloat16* B, float* C) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, true);
#else
  TORCH_CHECK(false, "this torch has no bf16 micro-kernel");
#endif
}

// after a thread's bf16 products: free the micro-kernel's hardware context (AMX tiles)
template <typename T>
inline void release_gemm() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if constexpr (kBf16<T>) at::native::cpublas::brgemm_release();
#endif
}

template <typename T>
KILN_WIDE_LOOPS void narrow_rows(const float* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = narrow_to<T>(x[i]);
}

// the bf16 backward's operands from two keys' rows (of R) of P^T and dS^T in fp32, p and ds: both rounded,
// row-major (A operands), and dS^T's rows as one VNNI pair (the B operand of dQ^T's product)
KILN_WIDE_LOOPS void narrow_key_pair(const float* p, const float* ds, int64_t R, uint16_t* p_out, uint16_t* ds_out,
                                     uint32_t* ds_pair) {
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t d0 = bf16_bits(ds[r]), d1 = bf16_bits(ds[R + r]);
    p_out[r] = bf16_bits(p[r]);
    p_out[R + r] = bf16_bits(p[R + r]);
    ds_out[r] = d0;
    ds_out[R + r] = d1;
    ds_pair[r] = d0 | static_cast<uint32_t>(d1) << 16;
  }
}

// a row-major (R, D) matrix x (R and D even for bf16) as the B operands (R, D) and, transposed, (D, R)
template <typename T>
void pack_b(const T* x, int64_t R, int64_t D, T* b, T* bt) {
  if constexpr (kBf16<T>) {  // as 32-bit words: a VNNI pair is one word
    const auto* x16 = reinterpret_cast<const uint16_t*>(x);
    const auto* x32 = reinterpret_cast<const uint32_t*>(x);
    auto* b32 = reinterpret_cast<uint32_t*>(b);
    auto* bt32 = reinterpret_cast<uint32_t*>(bt);
    for (int64_t r = 0; r < R; r += 2)
      for (int64_t d = 0; d < D; ++d)
        b32[r / 2 * D + d] = x16[r * D + d] | static_cast<uint32_t>(x16[(r + 1) * D + d]) << 16;
    for (int64_t p = 0; p < D / 2; ++p)
      for (int64_t r = 0; r < R; ++r) bt32[p * R + r] = x32[r * (D / 2) + p];
  } else {
    std::memcpy(b, x, sizeof(float) * R * D);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < R; ++r) bt[d * R + r] = x[r * D + d];
  }
}

struct AttnTask {
  int64_t b, kv_head, t0, t1, n_keys;
};

// softmax step of one chunk for one row: s[0:nc] holds the row's scores against keys c0..c0+nc-1 (to be
// multiplied by scale > 0), of which the first `visible` count; turns them into weights exp(scale s - max) (0
// past `visible`), updates the running max m and sum l, and returns the factor the row's earlier output must be
// scaled by.
KILN_WIDE_LOOPS float online_softmax_row(float* s, int64_t nc, int64_t visible, float scale, float& m, float& l) {
  if (visible <= 0) {
    std::memset(s, 0, sizeof(float) * nc);
    return 1.f;
  }
  const float mx = std::max(m, scale * row_max(s, visible));
  const float corr = exp_nonpositive(m - mx);  // m = -inf at the first chunk: 0 (l and the output are 0)
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < visible; ++j) {
    s[j] = exp_nonpositive(s[j] * scale - mx);
    sum += s[j];
  }
  for (int64_t j = visible; j < nc; ++j) s[j] = 0.f;
  l = l * corr + sum;
  m = mx;
  return corr;
}

// one key's row of the backward's (keys x query rows) buffers, in place: s holds the key's scores (to be
// multiplied by scale) against the block's query rows, dp its dP = dO . v; row g * Mp + t (query head g of the
// group, block position t) sees the key when first <= t < M. Makes s the weights P = exp(scale s - lse) (0
// where unseen) and dp the score gradients dS = P (dP - delta).
KILN_WIDE_LOOPS void attention_grad_row(float* s, float* dp, const float* lse, const float* delta, int64_t G,
                                        int64_t Mp, int64_t first, int64_t M, float scale) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t base = g * Mp, seen = std::min(first, M);
    for (int64_t t = 0; t < seen; ++t) s[base + t] = dp[base + t] = 0.f;
#pragma omp simd
    for (int64_t t = seen; t < M; ++t) {
      const int64_t r = base + t;
      const float p = exp_nonpositive(s[r] * scale - lse[r]);
      s[r] = p;
      dp[r] = p * (dp[r] - delta[r]);
    }
    for (int64_t t = std::max(seen, M); t < Mp; ++t) s[base + t] = dp[base + t] = 0.f;
  }
}

template <typename T>
void check_attention_inputs(std::initializer_list<const torch::Tensor*> ts, const char* what) {
  for (const auto* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == c10::CppTypeToScalarType<T>::value && t->dim() == 4 &&
                    t->stride(3) == 1 && (!kBf16<T> || t->size(3) % 2 == 0),
                what, " must be 4-D CPU tensors of one dtype (fp32, or bf16 with an even head dim) with a "
                "contiguous last dim");
  }
}

}  // namespace

// q (B, T, H, D), k and v (B, S, Hkv, D): CPU, the last dim contiguous (views of a qkv product or of the KV
// cache serve as they are); starts and lengths (B,) int64. Query t of row b sits at position starts[b] + t and
// sees keys 0..min(starts[b] + t, lengths[b] - 1). Returns (B, T, H, D) contiguous, so (B * T, H * D) for the
// output projection is a view.
namespace {
// the body of causal_attention for T = float or at::BFloat16 (q, k and v all of it); writes each real query
// row's log-sum-exp of its scaled scores into lse ((B, H, T) fp32 contiguous) when it is defined
template <typename T>
torch::Tensor causal_attention_impl(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor starts,
                                    torch::Tensor lengths, double scale, torch::Tensor lse) {
  check_attention_inputs<T>({&q, &k, &v}, "causal_attention: q, k and v");
  const int64_t B = q.size(0), T_q = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D,
              "causal_attention: k and v must both be (B, S, Hkv, D) for q (B, T, H, D)");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "causal_attention: H must be a multiple of Hkv");
  for (const auto* t : {&starts, &lengths}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->numel() == B,
                "causal_attention: starts and lengths must be (B,) int64");
  }
  auto st = starts.contiguous(), ln = lengths.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && lp[b] >= 1 && lp[b] <= S, "causal_attention: row ", b, " has start ", sp[b],
                " and length ", lp[b], "; need start >= 0 and 1 <= length <= ", S);
  }
  auto out = torch::empty({B, T_q, H, D}, q.options());
  if (B == 0 || T_q == 0 || H == 0 || D == 0) return out;
  const int64_t G = H / Hkv, rows_per = std::max<int64_t>(8, kAttnRows / G);
  const int64_t chunks = (S + kKeyChunk - 1) / kKeyChunk, S_pad = (S + kKeyPad - 1) / kKeyPad * kKeyPad;
  // fp32 scales the queries (as the products have always done); bf16 the fp32 scores (exact)
  const float sc = static_cast<float>(scale), q_scale = kBf16<T> ? 1.f : sc, s_scale = kBf16<T> ? sc : 1.f;

  // each kv head's keys transposed in chunks, (chunks, D, kKeyChunk), and its values, (S_pad, D), both as B
  // operands (`b_index`); zero from the row's length up to the next multiple of kKeyPad (what the products read)
  auto kt = torch::empty({B * Hkv, chunks, D, kKeyChunk}, q.options());
  auto vp = torch::empty({B * Hkv, S_pad, D}, q.options());
  const T* kptr = k.data_ptr<T>();
  const T* vptr = v.data_ptr<T>();
  T* ktp = kt.data_ptr<T>();
  T* vpp = vp.data_ptr<T>();
  const T zero = narrow_to<T>(0.f);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, n = lp[b], n_pad = (n + kKeyPad - 1) / kKeyPad * kKeyPad;
      const T* ks = kptr + b * k.stride(0) + h * k.stride(2);
      const T* vs = vptr + b * v.stride(0) + h * v.stride(2);
      T* kd = ktp + i * chunks * D * kKeyChunk;
      T* vd = vpp + i * S_pad * D;
      for (int64_t j = 0; j < n_pad; ++j) {
        T* kc = kd + (j / kKeyChunk) * D * kKeyChunk;
        const T* kr = ks + j * k.stride(1);
        const T* vr = vs + j * v.stride(1);
        for (int64_t d = 0; d < D; ++d) {
          kc[b_index<T>(d, j % kKeyChunk, kKeyChunk)] = j < n ? kr[d] : zero;
          vd[b_index<T>(j, d, D)] = j < n ? vr[d] : zero;
        }
      }
    }
  });

  std::vector<AttnTask> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t t0 = 0; t0 < T_q; t0 += rows_per) {
        const int64_t t1 = std::min(T_q, t0 + rows_per);
        tasks.push_back({b, h, t0, t1, std::min(sp[b] + t1, lp[b])});
      }
  std::stable_sort(tasks.begin(), tasks.end(), [](const AttnTask& a, const AttnTask& c) {
    return a.n_keys * (a.t1 - a.t0) > c.n_keys * (c.t1 - c.t0);
  });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const T* qptr = q.data_ptr<T>();
  T* optr = out.data_ptr<T>();
  float* lsep = lse.defined() ? lse.data_ptr<float>() : nullptr;
  at::parallel_for(0, std::min<int64_t>(n_tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const int64_t R_max = G * rows_per;
    std::vector<T> qb(R_max * D), pb(kBf16<T> ? R_max * kKeyChunk : 0);
    std::vector<float> ob(R_max * D), sb(R_max * kKeyChunk), m(R_max), l(R_max), corr(R_max);
    for (int64_t i; (i = next.fetch_add(1)) < n_tasks;) {
      const AttnTask& task = tasks[i];
      // M positions, padded to Mp = rows_per with zero queries (their outputs are dropped): one row count for
      // every product (each new shape would cost a compiled kernel of its own, kept for the thread's life)
      const int64_t M = task.t1 - task.t0, Mp = rows_per, R = G * Mp;
      const int64_t start = sp[task.b], len = lp[task.b];
      for (int64_t g = 0; g < G; ++g)  // row g * Mp + t: position task.t0 + t of query head kv_head * G + g
        for (int64_t t = 0; t < Mp; ++t) {
          T* dst = qb.data() + (g * Mp + t) * D;
          if (t >= M) {
            std::fill(dst, dst + D, zero);
            continue;
          }
          const T* src = qptr + task.b * q.stride(0) + (task.t0 + t) * q.stride(1) +
                         (task.kv_head * G + g) * q.stride(2);
          for (int64_t d = 0; d < D; ++d) dst[d] = kBf16<T> ? src[d] : narrow_to<T>(src[d] * q_scale);
        }
      std::fill(m.begin(), m.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + R, 0.f);
      const T* kd = ktp + (task.b * Hkv + task.kv_head) * chunks * D * kKeyChunk;
      const T* vd = vpp + (task.b * Hkv + task.kv_head) * S_pad * D;
      for (int64_t c0 = 0; c0 < task.n_keys; c0 += kKeyChunk) {
        const int64_t nc = std::min(kKeyChunk, (task.n_keys - c0 + kKeyPad - 1) / kKeyPad * kKeyPad);
        gemm(R, nc, D, D, kKeyChunk, nc, false, qb.data(), kd + c0 * D, sb.data());
        for (int64_t r = 0; r < R; ++r) {
          const int64_t pos = start + task.t0 + r % Mp;
          const int64_t visible = std::min(pos + 1, len) - c0;
          corr[r] = online_softmax_row(sb.data() + r * nc, nc, std::min(visible, nc), s_scale, m[r], l[r]);
        }
        if (c0 > 0) {
          for (int64_t r = 0; r < R; ++r)
            if (corr[r] != 1.f)
              for (int64_t d = 0; d < D; ++d) ob[r * D + d] *= corr[r];
        }
        const T* p = nullptr;  // the weights as the A operand
        if constexpr (kBf16<T>) {
          narrow_rows(sb.data(), pb.data(), R * nc);
          p = pb.data();
        } else {
          p = sb.data();
        }
        gemm(R, D, nc, nc, D, D, c0 > 0, p, vd + c0 * D, ob.data());  // (vd + c0 * D: c0 is even)
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < M; ++t) {
          const int64_t r = g * Mp + t;
          const float inv = 1.f / l[r];
          T* dst = optr + ((task.b * T_q + task.t0 + t) * H + task.kv_head * G + g) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = narrow_to<T>(ob[r * D + d] * inv);
          if (lsep != nullptr) lsep[(task.b * H + task.kv_head * G + g) * T_q + task.t0 + t] = m[r] + std::log(l[r]);
        }
    }
    release_gemm<T>();
  });
  return out;
}
}  // namespace

torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor starts,
                               torch::Tensor lengths, double scale) {
  return causal_attention_impl<float>(q, k, v, starts, lengths, scale, torch::Tensor());
}

// ----------------------------------------------------------------------------- causal attention for training
// Self-attention of T tokens from position 0 (q (B, T, H, D), k and v (B, T, Hkv, D), all fp32 or all bf16, the
// last dim contiguous) with autograd: the forward above, which also returns each query row's log-sum-exp
// (B, H, T), and its backward, flash attention's: the weights P = exp(scale q.k - lse) are recomputed from the
// saved log-sum-exp a block at a time, never held whole. A task is one (batch row, kv head): its G query heads'
// gradients and its keys' and values' (summed over the group in place, no repeat), so threads never write the
// same memory (with fewer tasks than threads, a task's query blocks are split over several, each summing its
// own key and value gradients, added up at the end). For each block of query rows (G heads x positions,
// stacked as in the forward) and chunk of the keys they see, five products through torch's micro-kernel,
// all laid out so none needs a transpose of the (keys x rows) intermediates: S^T = K Q^T, dP^T = V dO^T, then
// P^T and dS^T = P^T (dP^T - delta) in place, dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T.
std::vector<torch::Tensor> causal_attention_lse(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(1) == q.size(1),
              "causal_attention_lse: q (B, T, H, D) and k, v (B, T, Hkv, D) must hold the same T tokens");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  auto lse = torch::empty({B, H, T}, q.options().dtype(torch::kFloat32));
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto starts = torch::zeros({B}, opts), lengths = torch::full({B}, T, opts);
  auto out = q.scalar_type() == torch::kBFloat16
                 ? causal_attention_impl<at::BFloat16>(q, k, v, starts, lengths, scale, lse)
                 : causal_attention_impl<float>(q, k, v, starts, lengths, scale, lse);
  return {out, lse};
}

namespace {
constexpr int64_t kBwdKeyChunk = 256;  // keys per product of the backward (its two (keys x rows) buffers stay in L2)

template <typename T>
std::vector<torch::Tensor> attention_backward_impl(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                   torch::Tensor out, torch::Tensor grad, torch::Tensor lse,
                                                   double scale) {
  check_attention_inputs<T>({&q, &k, &v, &out, &grad}, "causal_attention_backward: q, k, v, out and grad");
  const int64_t B = q.size(0), T_q = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == T_q && k.size(3) == D,
              "causal_attention_backward: k and v must both be (B, T, Hkv, D) for q (B, T, H, D)");
  TORCH_CHECK(out.sizes() == q.sizes() && grad.sizes() == q.sizes(),
              "causal_attention_backward: out and grad must be shaped like q");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "causal_attention_backward: H must be a multiple of Hkv");
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == torch::kFloat32 && lse.is_contiguous() &&
                  lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T_q,
              "causal_attention_backward: lse must be (B, H, T) fp32 contiguous");
  auto dq = torch::empty({B, T_q, H, D}, q.options());
  auto dk = torch::empty({B, T_q, Hkv, D}, q.options());
  auto dv = torch::empty({B, T_q, Hkv, D}, q.options());
  if (B == 0 || T_q == 0 || H == 0 || D == 0) return {dq, dk, dv};
  const int64_t G = H / Hkv, Mp = std::max<int64_t>(8, kAttnRows / G), R = G * Mp;
  const int64_t T_pad = (T_q + kKeyPad - 1) / kKeyPad * kKeyPad;
  // fp32 scales the queries (dK comes out scaled); bf16 the fp32 scores, and dK at the end
  const float sc = static_cast<float>(scale), q_scale = kBf16<T> ? 1.f : sc, s_scale = kBf16<T> ? sc : 1.f;
  const T zero = narrow_to<T>(0.f);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  // with fewer (batch row, kv head) tasks than threads, each is split into `pieces` (query blocks dealt round
  // robin, so each piece gets its share of the causal work) whose key and value gradients are summed at the end
  const int64_t n_tasks = B * Hkv, n_blocks = (T_q + Mp - 1) / Mp, threads = at::get_num_threads();
  const int64_t pieces = std::min(n_blocks, std::max<int64_t>(1, (threads + n_tasks - 1) / n_tasks));
  const int64_t n_items = n_tasks * pieces;
  torch::Tensor partial;  // (n_items, 2, T, D) fp32: each piece's dK and dV, when split
  if (pieces > 1) partial = torch::empty({n_items, 2, T_q, D}, q.options().dtype(torch::kFloat32));
  float* pp = pieces > 1 ? partial.data_ptr<float>() : nullptr;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n_items, threads), 1, [&](int64_t, int64_t) {
    // the task's keys and values row-major (T_pad, D) and its keys transposed (D, T_pad), zero past T (A
    // operands); its key and value gradients; a query block's (scaled) queries and output gradients row-major
    // (qr, gr), then as B operands of both shapes, (R, D) and (D, R)
    std::vector<T> kr(T_pad * D), vr(T_pad * D), kt(D * T_pad), qr(R * D), gr(R * D);
    std::vector<T> qs(R * D), qt(D * R), gb(R * D), gt(D * R);
    std::vector<float> dka(T_pad * D), dva(T_pad * D), dqt(D * R), lrow(R), delta(R);
    std::vector<float> st(kBwdKeyChunk * R), dpt(kBwdKeyChunk * R);
    // bf16: P^T and dS^T rounded (A operands, (keys, R)), and dS^T as the B operand of dQ^T's product
    std::vector<T> pt_b(kBf16<T> ? kBwdKeyChunk * R : 0), ds_b(pt_b.size()), ds_v(pt_b.size());
    for (int64_t item; (item = next.fetch_add(1)) < n_items;) {
      const int64_t i = item / pieces, piece = item % pieces, b = i / Hkv, h = i % Hkv;
      for (int64_t j = 0; j < T_pad; ++j) {
        const T* ks = kp + b * k.stride(0) + j * k.stride(1) + h * k.stride(2);
        const T* vs = vp + b * v.stride(0) + j * v.stride(1) + h * v.stride(2);
        for (int64_t d = 0; d < D; ++d) {
          kr[j * D + d] = kt[d * T_pad + j] = j < T_q ? ks[d] : zero;
          vr[j * D + d] = j < T_q ? vs[d] : zero;
        }
      }
      std::fill(dka.begin(), dka.end(), 0.f);
      std::fill(dva.begin(), dva.end(), 0.f);
      for (int64_t t0 = piece * Mp; t0 < T_q; t0 += pieces * Mp) {
        const int64_t M = std::min(Mp, T_q - t0), n_keys = t0 + M;
        // row g * Mp + t: position t0 + t of query head h * G + g; rows t >= M are zero (and see no key). (A
        // position's G heads are adjacent in memory: read together.)
        for (int64_t t = 0; t < Mp; ++t)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = g * Mp + t;
            T* qd = qr.data() + r * D;
            T* gd = gr.data() + r * D;
            if (t >= M) {
              std::fill(qd, qd + D, zero);
              std::fill(gd, gd + D, zero);
              lrow[r] = delta[r] = 0.f;
              continue;
            }
            const T* qrow = qp + b * q.stride(0) + (t0 + t) * q.stride(1) + (h * G + g) * q.stride(2);
            const T* orow = op + b * out.stride(0) + (t0 + t) * out.stride(1) + (h * G + g) * out.stride(2);
            const T* grow = gp + b * grad.stride(0) + (t0 + t) * grad.stride(1) + (h * G + g) * grad.stride(2);
            float dsum = 0.f;
#pragma omp simd reduction(+ : dsum)
            for (int64_t d = 0; d < D; ++d) {
              qd[d] = kBf16<T> ? qrow[d] : narrow_to<T>(static_cast<float>(qrow[d]) * q_scale);
              gd[d] = grow[d];
              dsum += static_cast<float>(grow[d]) * static_cast<float>(orow[d]);
            }
            delta[r] = dsum;
            lrow[r] = lp[(b * H + h * G + g) * T_q + t0 + t];
          }
        pack_b(qr.data(), R, D, qs.data(), qt.data());
        pack_b(gr.data(), R, D, gb.data(), gt.data());
        for (int64_t c0 = 0; c0 < n_keys; c0 += kBwdKeyChunk) {
          const int64_t nc = std::min(kBwdKeyChunk, (n_keys - c0 + kKeyPad - 1) / kKeyPad * kKeyPad);
          gemm(nc, R, D, D, R, R, false, kr.data() + c0 * D, qt.data(), st.data());
          gemm(nc, R, D, D, R, R, false, vr.data() + c0 * D, gt.data(), dpt.data());
          for (int64_t jj = 0; jj < nc; jj += 2) {  // (nc is even)
            for (int64_t j = jj; j < jj + 2; ++j)
              attention_grad_row(st.data() + j * R, dpt.data() + j * R, lrow.data(), delta.data(), G, Mp,
                                 std::max<int64_t>(0, c0 + j - t0), M, s_scale);
            if constexpr (kBf16<T>)  // (while the two rows are in L1)
              narrow_key_pair(st.data() + jj * R, dpt.data() + jj * R, R,
                              reinterpret_cast<uint16_t*>(pt_b.data()) + jj * R,
                              reinterpret_cast<uint16_t*>(ds_b.data()) + jj * R,
                              reinterpret_cast<uint32_t*>(ds_v.data()) + jj / 2 * R);
          }
          const T *p, *ds, *ds_pairs;  // P^T and dS^T as A operands, dS^T as a B operand
          if constexpr (kBf16<T>) {
            p = pt_b.data(), ds = ds_b.data(), ds_pairs = ds_v.data();
          } else {
            p = st.data(), ds = ds_pairs = dpt.data();
          }
          gemm(nc, D, R, R, D, D, true, p, gb.data(), dva.data() + c0 * D);
          gemm(nc, D, R, R, D, D, true, ds, qs.data(), dka.data() + c0 * D);
          gemm(D, R, nc, T_pad, R, R, c0 > 0, kt.data() + c0, ds_pairs, dqt.data());
        }
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < M; ++t) {
            const int64_t r = g * Mp + t;
            T* dst = dqp + ((b * T_q + t0 + t) * H + h * G + g) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = narrow_to<T>(dqt[d * R + r] * sc);
          }
      }
      if (s_scale != 1.f)  // (bf16: dK = scale dS^T Q, the queries unscaled)
        for (float& x : dka) x *= s_scale;
      if (pp != nullptr) {
        std::memcpy(pp + item * 2 * T_q * D, dka.data(), sizeof(float) * T_q * D);
        std::memcpy(pp + (item * 2 + 1) * T_q * D, dva.data(), sizeof(float) * T_q * D);
        continue;
      }
      for (int64_t j = 0; j < T_q; ++j) {
        narrow_rows(dka.data() + j * D, dkp + ((b * T_q + j) * Hkv + h) * D, D);
        narrow_rows(dva.data() + j * D, dvp + ((b * T_q + j) * Hkv + h) * D, D);
      }
    }
    release_gemm<T>();
  });
  if (pp != nullptr) {  // the pieces' sums, in piece order (the same on every run with the same thread count)
    at::parallel_for(0, n_tasks * T_q, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> kd(D), vd(D);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r / T_q, j = r % T_q, b = i / Hkv, h = i % Hkv;
        std::fill(kd.begin(), kd.end(), 0.f);
        std::fill(vd.begin(), vd.end(), 0.f);
        for (int64_t piece = 0; piece < pieces; ++piece) {
          const float* src = pp + ((i * pieces + piece) * 2 * T_q + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            kd[d] += src[d];
            vd[d] += src[T_q * D + d];
          }
        }
        narrow_rows(kd.data(), dkp + ((b * T_q + j) * Hkv + h) * D, D);
        narrow_rows(vd.data(), dvp + ((b * T_q + j) * Hkv + h) * D, D);
      }
    });
  }
  return {dq, dk, dv};
}
}  // namespace

std::vector<torch::Tensor> causal_attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                     torch::Tensor out, torch::Tensor grad, torch::Tensor lse,
                                                     double scale) {
  if (q.scalar_type() == torch::kBFloat16) return attention_backward_impl<at::BFloat16>(q, k, v, out, grad, lse, scale);
  return attention_backward_impl<float>(q, k, v, out, grad, lse, scale);
}

// Whether bf16 inputs can go to causal_attention_lse / _backward: this torch has the bf16 micro-kernel and it
// runs on this CPU (a small product is tried; AVX-512 at least, the bf16 instructions emulated without AVX-512
// BF16 or AMX, where bf16 products are slower than fp32 ones, as all of bf16 autocast is).
bool attention_bf16_ready() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  try {
    std::vector<at::BFloat16> a(2 * 2, narrow_to<at::BFloat16>(1.5f)), b(2 * 16, narrow_to<at::BFloat16>(2.f));
    std::vector<float> c(2 * 16, 0.f);
    gemm(2, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data());
    release_gemm<at::BFloat16>();
    return c[0] == 6.f && c[31] == 6.f;
  } catch (const c10::Error&) {
    return false;
  }
#else
  return false;
#endif
}
#endif

// How many threads one at::parallel_for over `n` items runs on: torch's intra-op count when
// this file was built with OpenMP (as ATen's parallel_for needs), 1 when the pragma was dropped.
int64_t parallel_threads(int64_t n) {
  std::vector<int> used(static_cast<size_t>(std::max<int64_t>(1, at::get_num_threads())), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(used.size())) used[id] = 1;
  });
  int64_t count = 0;
  for (int u : used) count += u;
  return count;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "Kiln's fused CPU decode step (fp32 math; fp32 or bf16 weights)");
  m.def("sample_rows", &sample_rows, "one id per row: temperature, top-k, top-p, inverse-CDF draw");
  m.def("add_norm", &add_norm, "h += residual in place; returns RMSNorm/LayerNorm(h) (the CPU forward)");
  m.def("rope_", &rope_, "rotary embedding in place on the first n_heads heads of each row");
  m.def("silu_mul", &silu_mul, "SwiGLU: silu(gate) * up of rows holding [gate; up]");
  m.def("loss_rows_", &loss_rows_, "a chunk of the training loss's rows: losses, and the logits' gradient in place");
  m.def("token_logprobs", &token_logprobs, "per row: the target's logprob and the top logprobs with their ids");
  m.def("amx_ready", &amx_ready, "whether the bf16 micro-kernel (AMX tiles) is there for amx_pack/amx_linear");
  m.def("amx_pack", &amx_pack, "pack a bf16-exact fp32 weight (O, K) for amx_linear");
  m.def("amx_linear", &amx_linear, "x (N, K) fp32 times a packed weight as bf16 parts on AMX tiles, fp32 sums");
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  m.def("causal_attention", &causal_attention, "causal GQA attention of a prompt's queries (B, T, H, D)");
  m.def("causal_attention_lse", &causal_attention_lse, "causal self-attention (B, T, H, D) and its log-sum-exp");
  m.def("causal_attention_backward", &causal_attention_backward, "dq, dk, dv of causal_attention_lse");
  m.def("attention_bf16_ready", &attention_bf16_ready, "whether the training attention takes bf16 inputs here");
#endif
  m.def("parallel_threads", &parallel_threads, "threads one at::parallel_for over n items runs on");
}
