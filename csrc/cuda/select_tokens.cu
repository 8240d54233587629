// CUDA kernel of pio::select_tokens (SPEC section 3): the whole batch in one launch
// sequence, all on the device (no .item(), no host copy), static output shape, so it
// can be captured in a CUDA graph.
//
// Steps, on the current stream:
//  1. ATen, as the reference: rows L2-normalised in fp32 (x / max(||x||, 1e-12)), the
//     saliency order by two stable sorts (descending score with NaN as -inf, then the
//     group key valid < NaN < padding), so a row's first `n = lengths[b]` order positions
//     are its valid tokens in the reference's order. `lengths` is clamped to [0, N] on
//     the device (the Python wrapper checks values on the host only where it may sync).
//  2. similarity_mask_kernel: for the first M order positions of each row (the prefix
//     the walk is expected to need, M = min(N, max(4 * budget, 1024), 32768)), the bitmask
//     mask[i][j] = cos(x_order[i], x_order[j]) >= tau for j > i, in 64 x 64 tiles of an
//     fp32 SIMT GEMM (fp32 FMA, no TF32/bf16: the decision near tau must be the fp32 one
//     the reference makes), each tile packing its bits in shared memory before one store.
//     Tiles below the diagonal are skipped (never read).
//  3. scan_kernel, one CTA per row: the strict pass walks the prefix with the alive set
//     (M bits) in shared memory: find the next alive position (one warp, ballot + ffs),
//     select it, clear its mask row from the alive set, stop at the budget. If the prefix
//     runs out before the budget (heavy suppression), the walk continues lazily over the
//     remaining positions, each candidate compared with the picks by the whole CTA. The
//     fill pass and the ascending output come from a bitset over token indices and a
//     block-wide prefix sum.
//
// Bound (one row, N tokens, D features, prefix M): the mask GEMM is M^2 D FLOPs (upper
// triangle, 2 FLOPs per FMA) at the fp32 FMA peak (about 60 TFLOP/s on an H100 SXM);
// the normalisation reads N D x 2 bytes (bf16) and writes N D x 4 at HBM bandwidth
// (about 3.3 TB/s); the scan is latency-bound (two block barriers per pick).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../select_tokens_checks.h"

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pio {
namespace {

constexpr int kTile = 64;           // similarities per tile side
constexpr int kTileK = 16;          // features per shared-memory stage
constexpr int kMaskThreads = 256;   // 16 x 16 threads, 4 x 4 similarities each
constexpr int kScanThreads = 512;
constexpr int64_t kPrefixPerBudget = 4;
constexpr int64_t kPrefixMin = 1024;
constexpr int64_t kPrefixMax = 32768;  // 4 KiB of alive bits; B x M^2 / 8 bytes of mask

__global__ void __launch_bounds__(kMaskThreads)
similarity_mask_kernel(const float* __restrict__ xn,          // (B, N, D) normalised
                       const int* __restrict__ order,          // (B, N) saliency order
                       const int64_t* __restrict__ lengths,    // (B,) clamped to [0, N]
                       uint32_t* __restrict__ mask,            // (B, M, W)
                       int N, int D, int M, int W, float tau) {
  const int b = blockIdx.z;
  const int tile_i = blockIdx.y, tile_j = blockIdx.x;
  if (tile_j < tile_i) return;  // below the diagonal: the scan never reads these bits
  const int n = static_cast<int>(min(lengths[b], static_cast<int64_t>(M)));
  const int row0 = tile_i * kTile, col0 = tile_j * kTile;
  if (row0 >= n || col0 >= n) return;  // outside the valid prefix: never read

  __shared__ float As[kTileK][kTile + 4];
  __shared__ float Bs[kTileK][kTile + 4];
  __shared__ uint32_t bits[kTile][kTile / 32];
  __shared__ int rows[kTile];
  __shared__ int cols[kTile];

  const int tid = threadIdx.x;
  const int* ob = order + static_cast<int64_t>(b) * N;
  if (tid < kTile) {
    const int r = row0 + tid;
    rows[tid] = r < n ? ob[r] : -1;
  } else if (tid < 2 * kTile) {
    const int c = col0 + tid - kTile;
    cols[tid - kTile] = c < n ? ob[c] : -1;
  }
  if (tid < kTile * (kTile / 32)) bits[tid / 2][tid % 2] = 0u;
  __syncthreads();

  // Loader: thread -> (tile row lr, 4 consecutive features from lk).
  const int lr = tid >> 2, lk = (tid & 3) * 4;
  const float* xb = xn + static_cast<int64_t>(b) * N * D;
  const float* pa = rows[lr] >= 0 ? xb + static_cast<int64_t>(rows[lr]) * D : nullptr;
  const float* pb = cols[lr] >= 0 ? xb + static_cast<int64_t>(cols[lr]) * D : nullptr;
  // Compute: thread -> 4 x 4 similarities at (ty * 4 + i, tx * 4 + j).
  const int ty = tid / 16, tx = tid % 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < D; k0 += kTileK) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + lk + u;
      As[lk + u][lr] = (pa != nullptr && k < D) ? pa[k] : 0.f;
      Bs[lk + u][lr] = (pb != nullptr && k < D) ? pb[k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) c[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Threshold and pack: 4 bits per thread and row, OR-ed into the tile's words.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gi = row0 + ty * 4 + i;
    uint32_t nibble = 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gj = col0 + tx * 4 + j;
      const bool hit = gj > gi && gj < n && gi < n && acc[i][j] >= tau;
      nibble |= static_cast<uint32_t>(hit) << j;
    }
    if (nibble != 0u) atomicOr(&bits[ty * 4 + i][(tx * 4) / 32], nibble << ((tx * 4) % 32));
  }
  __syncthreads();
  if (tid < kTile * (kTile / 32)) {
    const int r = tid / 2, w = tid % 2;
    const int gi = row0 + r, gw = col0 / 32 + w;
    if (gi < n && gw < W) mask[(static_cast<int64_t>(b) * M + gi) * W + gw] = bits[r][w];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(kScanThreads)
scan_kernel(const uint32_t* __restrict__ mask,     // (B, M, W)
            const float* __restrict__ xn,          // (B, N, D)
            const int* __restrict__ order,         // (B, N)
            const int64_t* __restrict__ lengths,   // (B,) clamped to [0, N]
            int* __restrict__ picks_ws,            // (B, P) order positions of the picks
            uint32_t* __restrict__ chosen_ws,      // (B, Wn) zeroed: chosen token indices
            int64_t* __restrict__ out,             // (B, budget)
            int N, int D, int M, int W, int Wn, int P, int64_t budget, float tau) {
  extern __shared__ uint32_t alive[];  // W words: order positions still selectable
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int s_next;
  __shared__ int s_flag;

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kScanThreads / 32;
  const int n = static_cast<int>(lengths[b]);
  int64_t* o = out + static_cast<int64_t>(b) * budget;
  if (n <= budget) {  // keep every valid token, pad with -1
    for (int64_t i = tid; i < budget; i += kScanThreads) o[i] = i < n ? i : -1;
    return;
  }
  // From here n > budget >= 1, so every count below is < n <= N and fits an int.
  const int k = static_cast<int>(budget);
  const int m = min(n, M);
  const int* ob = order + static_cast<int64_t>(b) * N;
  const float* xb = xn + static_cast<int64_t>(b) * N * D;
  const uint32_t* mb = mask + static_cast<int64_t>(b) * M * W;
  int* picks = picks_ws + static_cast<int64_t>(b) * P;
  uint32_t* chosen = chosen_ws + static_cast<int64_t>(b) * Wn;

  for (int w = tid; w < W; w += kScanThreads) {
    const int lo = w * 32;
    alive[w] = lo + 32 <= m ? 0xffffffffu : (lo >= m ? 0u : (0xffffffffu >> (32 - (m - lo))));
  }
  __syncthreads();

  // Strict pass over the prefix.
  int count = 0, pos = 0;
  const int wm = (m + 31) / 32;
  while (count < k) {
    if (warp == 0) {
      int found = -1;
      const int start = pos >> 5;
      for (int w0 = start; w0 < wm; w0 += 32) {
        const int w = w0 + lane;
        uint32_t v = 0u;
        if (w < wm) {
          v = alive[w];
          if (w == start) v &= 0xffffffffu << (pos & 31);
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, v != 0u);
        if (ballot != 0u) {
          const int l = __ffs(ballot) - 1;
          const uint32_t first = __shfl_sync(0xffffffffu, v, l);
          found = ((w0 + l) << 5) + __ffs(first) - 1;
          break;
        }
      }
      if (lane == 0) s_next = found;
    }
    __syncthreads();
    const int next = s_next;
    if (next < 0) break;  // prefix exhausted
    if (tid == 0) picks[count] = next;
    ++count;
    pos = next + 1;
    // Suppress the neighbours of the pick (only positions after it still matter).
    const uint32_t* row = mb + static_cast<int64_t>(next) * W;
    for (int w = (next >> 5) + tid; w < wm; w += kScanThreads) alive[w] &= ~row[w];
    __syncthreads();
  }

  // Past the prefix: each remaining candidate against every pick, by the whole CTA.
  for (int r = m; r < n && count < k; ++r) {
    if (tid == 0) s_flag = 0;
    __syncthreads();
    const float* xc = xb + static_cast<int64_t>(ob[r]) * D;
    for (int p = warp; p < count; p += kWarps) {
      // Early exit once another warp found a neighbour; lane 0 reads, the warp agrees.
      const int seen = lane == 0 ? *reinterpret_cast<volatile int*>(&s_flag) : 0;
      if (__shfl_sync(0xffffffffu, seen, 0) != 0) break;
      const float* xp = xb + static_cast<int64_t>(ob[picks[p]]) * D;
      float acc = 0.f;
      for (int d = lane; d < D; d += 32) acc = fmaf(xp[d], xc[d], acc);
      acc = warp_sum(acc);
      if (lane == 0 && acc >= tau) s_flag = 1;
    }
    __syncthreads();
    const bool keep = s_flag == 0;
    if (keep) {
      if (tid == 0) picks[count] = r;
      ++count;
    }
    __syncthreads();  // the pick is visible before the next candidate reads picks[]
  }

  // Fill pass: the first k - count positions that are not picks, in order. picks[] is
  // ascending, so the number of picks before position r is a binary search.
  const int need = k - count;
  for (int r = tid; r < n; r += kScanThreads) {
    int lo = 0, hi = count;  // first index with picks[idx] >= r
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (picks[mid] < r) lo = mid + 1; else hi = mid;
    }
    const bool picked = lo < count && picks[lo] == r;
    const bool fill = !picked && (r - lo) < need;
    if (picked || fill) {
      const int t = ob[r];
      atomicOr(&chosen[t >> 5], 1u << (t & 31));
    }
  }
  __syncthreads();

  // Ascending output: a prefix sum of popcounts over contiguous chunks of words.
  const int wn = (n + 31) / 32;
  const int per = (wn + kScanThreads - 1) / kScanThreads;
  const int w_begin = min(tid * per, wn), w_end = min(w_begin + per, wn);
  int mine = 0;
  for (int w = w_begin; w < w_end; ++w) mine += __popc(chosen[w]);
  int offset = 0;
  BlockScan(scan_storage).ExclusiveSum(mine, offset);
  for (int w = w_begin; w < w_end; ++w) {
    uint32_t v = chosen[w];
    while (v != 0u) {
      const int bit = __ffs(v) - 1;
      if (offset < k) o[offset] = static_cast<int64_t>(w) * 32 + bit;
      ++offset;
      v &= v - 1u;
    }
  }
}

at::Tensor select_tokens_cuda(const at::Tensor& features, const at::Tensor& scores, int64_t budget,
                              double tau, const std::optional<at::Tensor>& lengths) {
  check_select_tokens_args(features, scores, budget, tau, lengths);
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);
  TORCH_CHECK_VALUE(N < (int64_t{1} << 30) && D < (int64_t{1} << 30), "N and D must be < 2^30");
  TORCH_CHECK_VALUE(B <= 65535, "batch must be <= 65535 on CUDA, got ", B);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor out = at::empty({B, budget}, features.options().dtype(at::kLong));
  if (B == 0) return out;
  if (N == 0) return out.fill_(-1);

  // lengths, clamped on the device: a value out of [0, N] cannot raise without a sync.
  const at::Tensor len = lengths.has_value()
                             ? lengths->clamp(0, N).contiguous()
                             : at::full({B}, N, features.options().dtype(at::kLong));
  // Normalised rows, the same ATen ops as F.normalize in the reference.
  const at::Tensor xf = features.to(at::kFloat);
  const at::Tensor xn = (xf / at::norm(xf, 2, {-1}, /*keepdim=*/true).clamp_min(1e-12)).contiguous();
  // Saliency order: descending score (NaN as -inf), then stably by group valid < NaN < padding.
  const at::Tensor nan = scores.isnan();
  const at::Tensor finite_first = at::where(nan, at::full({}, -INFINITY, scores.options()), scores);
  const at::Tensor by_score =
      std::get<1>(finite_first.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor pos = at::arange(N, len.options()).unsqueeze(0);
  const at::Tensor group = at::where(pos >= len.unsqueeze(1), at::full({}, 2, nan.options().dtype(at::kByte)),
                                     nan.to(at::kByte));
  const at::Tensor by_group =
      std::get<1>(group.gather(1, by_score).sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  const at::Tensor order = by_score.gather(1, by_group).to(at::kInt).contiguous();

  const int64_t M = std::min({N, std::max(kPrefixPerBudget * std::min(budget, N), kPrefixMin), kPrefixMax});
  const int64_t W = (M + 31) / 32, Wn = (N + 31) / 32, P = std::min(budget, N);
  const float tau_f = fp32_threshold(tau);
  at::Tensor mask = at::empty({B, M, W}, features.options().dtype(at::kInt));
  at::Tensor picks = at::empty({B, P}, features.options().dtype(at::kInt));
  at::Tensor chosen = at::zeros({B, Wn}, features.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int tiles = static_cast<int>((M + kTile - 1) / kTile);
  similarity_mask_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(B)), kMaskThreads, 0, stream>>>(
      xn.data_ptr<float>(), order.data_ptr<int>(), len.data_ptr<int64_t>(),
      reinterpret_cast<uint32_t*>(mask.data_ptr<int>()), static_cast<int>(N), static_cast<int>(D),
      static_cast<int>(M), static_cast<int>(W), tau_f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_kernel<<<static_cast<unsigned>(B), kScanThreads, W * sizeof(uint32_t), stream>>>(
      reinterpret_cast<const uint32_t*>(mask.data_ptr<int>()), xn.data_ptr<float>(),
      order.data_ptr<int>(), len.data_ptr<int64_t>(), picks.data_ptr<int>(),
      reinterpret_cast<uint32_t*>(chosen.data_ptr<int>()), out.data_ptr<int64_t>(),
      static_cast<int>(N), static_cast<int>(D), static_cast<int>(M), static_cast<int>(W),
      static_cast<int>(Wn), static_cast<int>(P), budget, tau_f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pio, CUDA, m) { m.impl("select_tokens", &select_tokens_cuda); }

}  // namespace pio
