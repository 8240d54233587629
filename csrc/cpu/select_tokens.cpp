// CPU kernel of pio::select_tokens (SPEC section 3), parallel over the batch.
//
// Per row the similarity matrix is never built: a candidate is compared only
// with the tokens already selected, in saliency order, and the walk stops at the
// budget. Cost is at most (candidates walked) x (selected) x D multiply-adds plus
// (candidates walked) x D to convert and normalise them, against N x N x D for the full
// matrix the reference builds; the picks' rows (budget x D fp32) are streamed from cache
// for every candidate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../select_tokens_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace pio {
namespace {

// Where the compiler and CPU allow it, the dot products get an AVX2+FMA clone chosen at
// load time (the default build targets baseline x86-64, i.e. SSE2).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PIO_SIMD_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define PIO_SIMD_CLONES
#endif

// fp32 dot product with independent partial sums so the compiler can vectorise.
PIO_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Converts one row to fp32 and L2-normalises it as F.normalize does: x / max(||x||, 1e-12).
template <typename T>
void normalise_row(const T* row, int64_t d, float* dst) {
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(row[j]);
  const float denom = std::max(std::sqrt(dot(dst, dst, d)), 1e-12f);
  for (int64_t j = 0; j < d; ++j) dst[j] /= denom;
}

// Selects `budget` of the first `n` rows of one batch row.
// x: (N, D) contiguous, any floating type; s: (N,) fp64; out: (budget,) int64.
//
// Rows are converted and normalised lazily: only the candidates the walk reaches are
// touched, and only the picked ones are kept (budget x D floats), so a small budget reads a
// prefix of the saliency order instead of all N rows. The comparison is
// `float(cos) >= float(tau)`, the fp32 comparison the reference's `x @ x.T >= tau` makes.
template <typename T>
void select_row(const T* x, const double* s, int64_t n, int64_t d, int64_t budget, float tau,
                int64_t* out) {
  if (n <= budget) {
    for (int64_t i = 0; i < budget; ++i) out[i] = i < n ? i : -1;
    return;
  }
  // Saliency order: NaN last, then descending score, ties to the lower index.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [s](int64_t a, int64_t b) {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;  // the non-NaN one first
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  });

  std::vector<float> kept(static_cast<size_t>(budget) * d);  // normalised rows of the picks
  std::vector<int64_t> picked;
  picked.reserve(budget);
  std::vector<uint8_t> is_picked(n, 0);
  // Strict pass: a candidate survives when no token selected before it is a
  // neighbour (cos >= tau). Same as suppressing each pick's neighbours eagerly.
  for (int64_t r = 0; r < n && static_cast<int64_t>(picked.size()) < budget; ++r) {
    const int64_t c = order[r];
    const int64_t np = static_cast<int64_t>(picked.size());
    float* xc = kept.data() + np * d;  // the next free slot
    normalise_row(x + c * d, d, xc);
    bool suppressed = false;
    for (int64_t p = 0; p < np && !suppressed; ++p) suppressed = dot(kept.data() + p * d, xc, d) >= tau;
    if (!suppressed) {
      picked.push_back(c);
      is_picked[c] = 1;
    }
  }
  // Fill pass: the same order, whatever is not yet selected.
  for (int64_t r = 0; r < n && static_cast<int64_t>(picked.size()) < budget; ++r) {
    const int64_t c = order[r];
    if (!is_picked[c]) {
      picked.push_back(c);
      is_picked[c] = 1;
    }
  }
  std::sort(picked.begin(), picked.end());
  std::copy(picked.begin(), picked.end(), out);
}

at::Tensor select_tokens_cpu(const at::Tensor& features, const at::Tensor& scores, int64_t budget,
                             double tau, const std::optional<at::Tensor>& lengths) {
  check_select_tokens_args(features, scores, budget, tau, lengths);
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);

  const at::Tensor x = features.contiguous();  // converted to fp32 row by row, when walked
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  std::vector<int64_t> len(B, N);
  if (lengths.has_value()) {
    const at::Tensor lc = lengths->contiguous();
    const int64_t* lp = lc.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= N, "lengths must lie in [0, ", N, "], got ", lp[b],
                        " at row ", b);
      len[b] = lp[b];
    }
  }

  const float tau_f = fp32_threshold(tau);
  at::Tensor out = at::empty({B, budget}, features.options().dtype(at::kLong));
  const double* sp = s.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "select_tokens_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        select_row(xp + b * N * D, sp + b * N, len[b], D, budget, tau_f, op + b * budget);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pio, CPU, m) { m.impl("select_tokens", &select_tokens_cpu); }

}  // namespace pio
