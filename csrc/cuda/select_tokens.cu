// CUDA kernel of pio::select_tokens (SPEC section 3): the whole batch in one fixed launch
// sequence, all on the device (no .item(), no host copy), static output shape, so it
// can be captured in a CUDA graph.
//
// Steps, on the current stream:
//  1. ATen, as the reference: rows L2-normalised in fp32 (x / max(||x||, 1e-12)), the
//     saliency order by two stable sorts (descending score with NaN as -inf, then the
//     group key valid < NaN < padding), so a row's first `n = lengths[b]` order positions
//     are its valid tokens in the reference's order. `lengths` is clamped to [0, N] on
//     the device (the Python wrapper checks values on the host only where it may sync).
//  2. The strict pass, block by block over the order positions. The blocks depend on N and
//     the budget only (pio_kernels.nms.block_plan mirrors the numbers below): a prefix of
//     M = min(N, max(4 * budget, 1024), 32768) positions, where the walk usually ends, then
//     the rest cut into at most about kTailBlocks blocks. Per block, three kernels:
//     - cross_kernel (not for the prefix): each candidate of the block against every pick
//       so far, 64 x 64 tiles of the same fp32 GEMM as below; a candidate with a cosine
//       >= tau to a pick is suppressed (bit set in `sup`). A tile of candidates stops at
//       the first chunk of picks after which all of them are suppressed.
//     - similarity_mask_kernel: the bitmask mask[i][j] = cos(x_order[i], x_order[j]) >= tau
//       for block positions j > i, in 64 x 64 tiles of an fp32 SIMT GEMM (fp32 FMA, no
//       TF32/bf16: the decision near tau must be the fp32 one the reference makes), each
//       tile packing its bits in shared memory before one store. Tiles below the diagonal
//       are skipped, and so are tiles whose rows or whose columns are all suppressed: the
//       scan reads only the rows of picks (never suppressed), and stale bits in a column
//       that is already suppressed clear nothing that is still alive.
//     - scan_kernel, one CTA per row: the walk over the block with the alive set (the
//       block's positions less `sup`) in shared memory: find the next alive position (one
//       warp, ballot + ffs), select it, clear its mask row from the alive set, stop at the
//       budget. The count of picks per row stays on the device between blocks.
//     Every kernel returns at once for a row that is done (its budget reached, or it has no
//     positions in the block): after the prefix the later launches cost a few microseconds.
//  3. finish_kernel, one CTA per row: the fill pass and the ascending output from a bitset
//     over token indices and a block-wide prefix sum.
//
// Bound (one row, N tokens, D features, prefix M, blocks of T after it): the prefix mask GEMM
// is M^2 D FLOPs (upper triangle, 2 FLOPs per FMA) at the fp32 FMA peak (about 60 TFLOP/s
// on an H100 SXM); the normalisation reads N D x 2 bytes (bf16) and writes N D x 4 at HBM
// bandwidth (about 3.3 TB/s). Past the prefix, at most 2 (N - M) (k + T / 2) D FLOPs (each
// candidate against the <= k picks and its own block; live tiles only), in place of
// the up to N - M serial steps of a walk that tests one candidate at a time. The scans are
// latency-bound (two block barriers per pick).
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
#include <vector>

namespace pio {
namespace {

constexpr int kTile = 64;           // similarities per tile side
constexpr int kTileK = 16;          // features per shared-memory stage
constexpr int kMaskThreads = 256;   // 16 x 16 threads, 4 x 4 similarities each
constexpr int kScanThreads = 512;
// The block plan, mirrored by pio_kernels.nms (PREFIX_PER_BUDGET, ...): keep them equal.
constexpr int64_t kPrefixPerBudget = 4;
constexpr int64_t kPrefixMin = 1024;
constexpr int64_t kPrefixMax = 32768;   // 4 KiB of alive bits; B x M^2 / 8 bytes of mask
constexpr int64_t kTailBlocks = 8;
constexpr int64_t kTailBlockMax = 4096;
constexpr int64_t kBlockAlign = 64;

struct Block {
  int64_t start, size;
};

// pio_kernels.nms.block_plan: (start, size) of the blocks of order positions, in order.
std::vector<Block> block_plan(int64_t n, int64_t budget) {
  const int64_t prefix = std::min({n, std::max(kPrefixPerBudget * std::min(budget, n), kPrefixMin), kPrefixMax});
  std::vector<Block> blocks{{0, prefix}};
  const int64_t rest = n - prefix;
  if (rest > 0) {
    int64_t per = (rest + kTailBlocks - 1) / kTailBlocks;
    per = (per + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    const int64_t size = std::min(rest, std::max(prefix, std::min(per, kTailBlockMax)));
    for (int64_t start = prefix; start < n; start += size) blocks.push_back({start, std::min(size, n - start)});
  }
  return blocks;
}

// Bits of word w (positions 32 w ... 32 w + 31) that lie below m.
__device__ __forceinline__ uint32_t range_bits(int w, int m) {
  const int lo = w * 32;
  return lo + 32 <= m ? 0xffffffffu : (lo >= m ? 0u : (0xffffffffu >> (32 - (m - lo))));
}

// A row takes part in a block when it has more valid tokens than the budget (else it keeps
// them all), its budget is not reached yet, and it has positions in the block; then
// m = min(n - start, size) of the block's positions are valid.
__device__ __forceinline__ int block_positions(int n, int count, int k, int start, int size) {
  if (n <= k || count >= k || start >= n) return 0;
  return min(n - start, size);
}

// Shared-memory stages of the 64 x 64 fp32 GEMM tile below.
struct TileStage {
  float a[kTileK][kTile + 4];
  float b[kTileK][kTile + 4];
};

// acc[i][j] += dot(x[rows[ty * 4 + i]], x[cols[tx * 4 + j]]) over the D features, for the
// thread (ty, tx) = (tid / 16, tid % 16) of 256, in fp32 FMA in feature order; a token
// index < 0 reads as a zero row. rows/cols: 64 token indices each, in shared memory.
// Starts and ends with every thread past a barrier.
__device__ __forceinline__ void tile_dots(const float* __restrict__ xb, const int* rows, const int* cols, int D,
                                          TileStage& st, float (&acc)[4][4]) {
  const int tid = threadIdx.x;
  // Loader: thread -> (tile row lr, 4 consecutive features from lk).
  const int lr = tid >> 2, lk = (tid & 3) * 4;
  const float* pa = rows[lr] >= 0 ? xb + static_cast<int64_t>(rows[lr]) * D : nullptr;
  const float* pb = cols[lr] >= 0 ? xb + static_cast<int64_t>(cols[lr]) * D : nullptr;
  const int ty = tid / 16, tx = tid % 16;
  for (int k0 = 0; k0 < D; k0 += kTileK) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k = k0 + lk + u;
      st.a[lk + u][lr] = (pa != nullptr && k < D) ? pa[k] : 0.f;
      st.b[lk + u][lr] = (pb != nullptr && k < D) ? pb[k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = st.a[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) c[j] = st.b[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Candidates of one block against the picks so far: sup bit of block position r set when
// cos(x_order[start + r], x_pick) >= tau for some pick. Grid (tiles of 64 candidates, B).
__global__ void __launch_bounds__(kMaskThreads)
cross_kernel(const float* __restrict__ xn,          // (B, N, D) normalised
             const int* __restrict__ order,          // (B, N) saliency order
             const int64_t* __restrict__ lengths,    // (B,) clamped to [0, N]
             const int* __restrict__ picks_ws,       // (B, P) order positions of the picks
             const int* __restrict__ count_ws,       // (B,) picks so far
             uint32_t* __restrict__ sup_ws,          // (B, W) suppressed block positions
             int N, int D, int P, int W, int k, int start, int size, float tau) {
  const int b = blockIdx.y;
  const int count = count_ws[b];
  const int m = block_positions(static_cast<int>(lengths[b]), count, k, start, size);
  const int row0 = blockIdx.x * kTile;
  if (row0 >= m) return;  // done row, or no candidate here: nothing reads these bits

  __shared__ TileStage st;
  __shared__ int rows[kTile];
  __shared__ int cols[kTile];
  __shared__ uint32_t sup[kTile / 32];

  const int tid = threadIdx.x;
  const int* ob = order + static_cast<int64_t>(b) * N;
  const int* pk = picks_ws + static_cast<int64_t>(b) * P;
  const float* xb = xn + static_cast<int64_t>(b) * N * D;
  if (tid < kTile) rows[tid] = row0 + tid < m ? ob[start + row0 + tid] : -1;
  if (tid < kTile / 32) sup[tid] = 0u;
  const uint32_t live0 = range_bits(row0 / 32, m), live1 = range_bits(row0 / 32 + 1, m);
  const int ty = tid / 16, tx = tid % 16;

  for (int p0 = 0; p0 < count; p0 += kTile) {
    if (tid >= kTile && tid < 2 * kTile) {
      const int p = p0 + tid - kTile;
      cols[tid - kTile] = p < count ? ob[pk[p]] : -1;
    }
    __syncthreads();  // rows, cols and sup written
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    tile_dots(xb, rows, cols, D, st, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
      bool hit = false;
#pragma unroll
      for (int j = 0; j < 4; ++j) hit |= p0 + tx * 4 + j < count && acc[i][j] >= tau;
      if (hit && row0 + r < m) atomicOr(&sup[r / 32], 1u << (r % 32));
    }
    __syncthreads();  // sup complete for this chunk; everyone is done reading cols
    if ((sup[0] & live0) == live0 && (sup[1] & live1) == live1) break;  // all suppressed (uniform)
  }
  if (tid < kTile / 32) sup_ws[static_cast<int64_t>(b) * W + row0 / 32 + tid] = sup[tid];
}

// The block's mask: bit j of row i (block positions, j > i) when cos >= tau.
// Grid (tiles, tiles, B) over the block's 64-position tiles.
__global__ void __launch_bounds__(kMaskThreads)
similarity_mask_kernel(const float* __restrict__ xn,          // (B, N, D) normalised
                       const int* __restrict__ order,          // (B, N) saliency order
                       const int64_t* __restrict__ lengths,    // (B,) clamped to [0, N]
                       const int* __restrict__ count_ws,       // (B,) picks so far
                       const uint32_t* __restrict__ sup_ws,    // (B, W), read when use_sup
                       uint32_t* __restrict__ mask,            // (B, T, W), T = 32 W
                       int N, int D, int W, int k, int start, int size, bool use_sup, float tau) {
  const int b = blockIdx.z;
  const int tile_i = blockIdx.y, tile_j = blockIdx.x;
  if (tile_j < tile_i) return;  // below the diagonal: the scan never reads these bits
  const int m = block_positions(static_cast<int>(lengths[b]), count_ws[b], k, start, size);
  const int row0 = tile_i * kTile, col0 = tile_j * kTile;
  if (row0 >= m || col0 >= m) return;  // outside the valid block: never read
  if (use_sup) {  // a tile without a live row or without a live column is never needed
    const uint32_t* sb = sup_ws + static_cast<int64_t>(b) * W;
    const int wr = row0 / 32, wc = col0 / 32;
    const uint32_t live_r = (~sb[wr] & range_bits(wr, m)) | (~sb[wr + 1] & range_bits(wr + 1, m));
    const uint32_t live_c = (~sb[wc] & range_bits(wc, m)) | (~sb[wc + 1] & range_bits(wc + 1, m));
    if (live_r == 0u || live_c == 0u) return;
  }

  __shared__ TileStage st;
  __shared__ uint32_t bits[kTile][kTile / 32];
  __shared__ int rows[kTile];
  __shared__ int cols[kTile];

  const int tid = threadIdx.x;
  const int* ob = order + static_cast<int64_t>(b) * N + start;
  if (tid < kTile) {
    const int r = row0 + tid;
    rows[tid] = r < m ? ob[r] : -1;
  } else if (tid < 2 * kTile) {
    const int c = col0 + tid - kTile;
    cols[tid - kTile] = c < m ? ob[c] : -1;
  }
  if (tid < kTile * (kTile / 32)) bits[tid / 2][tid % 2] = 0u;
  __syncthreads();

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  tile_dots(xn + static_cast<int64_t>(b) * N * D, rows, cols, D, st, acc);

  // Threshold and pack: 4 bits per thread and row, OR-ed into the tile's words.
  const int ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gi = row0 + ty * 4 + i;
    uint32_t nibble = 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gj = col0 + tx * 4 + j;
      const bool hit = gj > gi && gj < m && gi < m && acc[i][j] >= tau;
      nibble |= static_cast<uint32_t>(hit) << j;
    }
    if (nibble != 0u) atomicOr(&bits[ty * 4 + i][(tx * 4) / 32], nibble << ((tx * 4) % 32));
  }
  __syncthreads();
  if (tid < kTile * (kTile / 32)) {
    const int r = tid / 2, w = tid % 2;
    const int gi = row0 + r;
    if (gi < m) mask[(static_cast<int64_t>(b) * (32 * W) + gi) * W + col0 / 32 + w] = bits[r][w];
  }
}

// The strict pass over one block, one CTA per row: picks appended to picks_ws (order
// positions, ascending), their number kept in count_ws.
__global__ void __launch_bounds__(kScanThreads)
scan_kernel(const uint32_t* __restrict__ mask,     // (B, T, W)
            const uint32_t* __restrict__ sup_ws,   // (B, W), read when use_sup
            const int64_t* __restrict__ lengths,   // (B,) clamped to [0, N]
            int* __restrict__ picks_ws,            // (B, P)
            int* __restrict__ count_ws,            // (B,)
            int W, int P, int k, int start, int size, bool use_sup) {
  extern __shared__ uint32_t alive[];  // W words: block positions still selectable
  __shared__ int s_next;

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int count = count_ws[b];
  const int m = block_positions(static_cast<int>(lengths[b]), count, k, start, size);
  if (m == 0) return;  // the same for every thread of the CTA
  const uint32_t* mb = mask + static_cast<int64_t>(b) * (32 * W) * W;
  const uint32_t* sb = sup_ws + static_cast<int64_t>(b) * W;
  int* picks = picks_ws + static_cast<int64_t>(b) * P;

  const int wm = (m + 31) / 32;
  for (int w = tid; w < wm; w += kScanThreads) alive[w] = range_bits(w, m) & (use_sup ? ~sb[w] : 0xffffffffu);
  __syncthreads();

  int pos = 0;
  while (count < k) {
    if (warp == 0) {
      int found = -1;
      const int first = pos >> 5;
      for (int w0 = first; w0 < wm; w0 += 32) {
        const int w = w0 + lane;
        uint32_t v = 0u;
        if (w < wm) {
          v = alive[w];
          if (w == first) v &= 0xffffffffu << (pos & 31);
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, v != 0u);
        if (ballot != 0u) {
          const int l = __ffs(ballot) - 1;
          const uint32_t word = __shfl_sync(0xffffffffu, v, l);
          found = ((w0 + l) << 5) + __ffs(word) - 1;
          break;
        }
      }
      if (lane == 0) s_next = found;
    }
    __syncthreads();
    const int next = s_next;
    if (next < 0) break;  // block exhausted
    if (tid == 0) picks[count] = start + next;
    ++count;
    pos = next + 1;
    // Suppress the neighbours of the pick (only positions after it still matter).
    const uint32_t* row = mb + static_cast<int64_t>(next) * W;
    for (int w = (next >> 5) + tid; w < wm; w += kScanThreads) alive[w] &= ~row[w];
    __syncthreads();
  }
  if (tid == 0) count_ws[b] = count;
}

// Fill pass and ascending output, one CTA per row.
__global__ void __launch_bounds__(kScanThreads)
finish_kernel(const int* __restrict__ order,         // (B, N)
              const int64_t* __restrict__ lengths,   // (B,) clamped to [0, N]
              const int* __restrict__ picks_ws,      // (B, P) ascending
              const int* __restrict__ count_ws,      // (B,)
              uint32_t* __restrict__ chosen_ws,      // (B, Wn) zeroed: chosen token indices
              int64_t* __restrict__ out,             // (B, budget)
              int N, int P, int Wn, int64_t budget) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;

  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const int n = static_cast<int>(lengths[b]);
  int64_t* o = out + static_cast<int64_t>(b) * budget;
  if (n <= budget) {  // keep every valid token, pad with -1
    for (int64_t i = tid; i < budget; i += kScanThreads) o[i] = i < n ? i : -1;
    return;
  }
  // From here n > budget >= 1, so every count below is < n <= N and fits an int.
  const int k = static_cast<int>(budget);
  const int* ob = order + static_cast<int64_t>(b) * N;
  const int* picks = picks_ws + static_cast<int64_t>(b) * P;
  uint32_t* chosen = chosen_ws + static_cast<int64_t>(b) * Wn;
  const int count = count_ws[b];

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

  // Block plan (static: from N and the budget only) and the device-side state it walks with.
  const std::vector<Block> blocks = block_plan(N, budget);
  int64_t T = 0;  // the largest block, rounded up to whole 64 x 64 tiles
  for (const Block& blk : blocks) T = std::max(T, blk.size);
  T = (T + kTile - 1) / kTile * kTile;
  const int64_t W = T / 32, Wn = (N + 31) / 32, P = std::min(budget, N);
  const int k = static_cast<int>(P);  // a row with n > budget has n <= N: then budget == P
  const float tau_f = fp32_threshold(tau);
  const auto ints = features.options().dtype(at::kInt);
  at::Tensor mask = at::empty({B, T, W}, ints);       // one block's bitmask, reused block after block
  at::Tensor sup = at::zeros({B, W}, ints);           // the block's candidates suppressed by earlier picks
  at::Tensor picks = at::empty({B, P}, ints);         // order positions of the strict-pass picks
  at::Tensor count = at::zeros({B}, ints);            // picks so far
  at::Tensor chosen = at::zeros({B, Wn}, ints);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* xp = xn.data_ptr<float>();
  const int* op = order.data_ptr<int>();
  const int64_t* lp = len.data_ptr<int64_t>();
  uint32_t* mp = reinterpret_cast<uint32_t*>(mask.data_ptr<int>());
  uint32_t* sp = reinterpret_cast<uint32_t*>(sup.data_ptr<int>());
  int* pp = picks.data_ptr<int>();
  int* cp = count.data_ptr<int>();
  const int n_i = static_cast<int>(N), d_i = static_cast<int>(D), w_i = static_cast<int>(W);
  const int p_i = static_cast<int>(P);
  const unsigned batch = static_cast<unsigned>(B);

  for (const Block& blk : blocks) {
    const int start = static_cast<int>(blk.start), size = static_cast<int>(blk.size);
    const unsigned tiles = static_cast<unsigned>((blk.size + kTile - 1) / kTile);
    const bool use_sup = start > 0;  // the prefix comes first: no picks before it
    if (use_sup) {
      cross_kernel<<<dim3(tiles, batch), kMaskThreads, 0, stream>>>(xp, op, lp, pp, cp, sp, n_i, d_i, p_i, w_i, k,
                                                                     start, size, tau_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    similarity_mask_kernel<<<dim3(tiles, tiles, batch), kMaskThreads, 0, stream>>>(
        xp, op, lp, cp, sp, mp, n_i, d_i, w_i, k, start, size, use_sup, tau_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_kernel<<<batch, kScanThreads, W * sizeof(uint32_t), stream>>>(mp, sp, lp, pp, cp, w_i, p_i, k, start, size,
                                                                      use_sup);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_kernel<<<batch, kScanThreads, 0, stream>>>(op, lp, pp, cp, reinterpret_cast<uint32_t*>(chosen.data_ptr<int>()),
                                                    out.data_ptr<int64_t>(), n_i, p_i, static_cast<int>(Wn), budget);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pio, CUDA, m) { m.impl("select_tokens", &select_tokens_cuda); }

}  // namespace pio
