// Argument checks (and the fp32 threshold) of pio::select_tokens shared by its kernels (csrc/cpu, csrc/cuda), so a
// direct torch.ops.pio.select_tokens call refuses bad input the same way on every device.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError. Only
// shapes, dtypes and devices are read here; the values of `lengths` are each kernel's own
// business (the CPU kernel raises, the CUDA kernel clamps rather than sync).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>

namespace pio {

inline void check_select_tokens_args(const at::Tensor& features, const at::Tensor& scores, int64_t budget,
                                     double tau, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK_VALUE(features.dim() == 3, "features must be (B, N, D), got ", features.dim(), " dims");
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()),
                   "features must be floating point, got ", features.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores must be floating point, got ",
                   scores.scalar_type());
  const int64_t B = features.size(0), N = features.size(1);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == N,
                    "scores must be (B, N) = (", B, ", ", N, "), got ", scores.sizes());
  TORCH_CHECK_VALUE(budget >= 1, "budget must be >= 1, got ", budget);
  TORCH_CHECK_VALUE(!std::isnan(tau), "tau must not be NaN");
  TORCH_CHECK_VALUE(scores.device() == features.device(), "scores must be on ", features.device(),
                    ", got ", scores.device());
  if (lengths.has_value()) {
    const at::Tensor& l = *lengths;
    TORCH_CHECK_VALUE(l.device() == features.device(), "lengths must be on ", features.device(),
                      ", got ", l.device());
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "lengths must be int64, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == B, "lengths must be (B,) = (", B, ",), got ",
                      l.sizes());
  }
}

// tau as the fp32 scalar torch compares an fp32 cosine with (the reference's ``x @ x.T >= tau``),
// saturating so a huge |tau| becomes +-inf instead of overflowing the cast.
inline float fp32_threshold(double tau) {
  constexpr float kMax = std::numeric_limits<float>::max();
  if (tau > kMax) return std::numeric_limits<float>::infinity();
  if (tau < -kMax) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(tau);
}

}  // namespace pio
