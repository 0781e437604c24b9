// CUDA path of kernels/mla_decode.py: the split kernel of absorbed-MLA decode (flash-decoding), for the
// DeepSeek-V3 row (Lkv 512, R 64) in bf16, in two versions: a Hopper one on wgmma (sm_90a) and an mma.sync one
// for sm_8x cards. Same contract as the Triton split kernel: each program writes the normalised partial output
// of its split and the split's natural-log lse (o = 0, lse = -inf when empty); kernels/helix_combine.py merges
// the splits. Grid (head tiles, splits, B), head tiles fastest so that the programs of one split read a tile
// from HBM once and from L2 after. Rows past H are zero queries, never stored. Tiles are copied by cp.async,
// one page lookup per token row, so any tokens-per-block works; tokens past the end are zero-filled and masked.
//
// Hopper kernel (mla_split_kernel_sm90): HW = 64 head rows (M of both products), WN = 64 tokens a tile, two
// warpgroups (WG0, WG1). Shared memory: Q [64, 576] and 2 tile stages, each 9 column blocks of [64 rows, 128 B]
// under the 128-byte swizzle that wgmma's descriptors read, plus P [64, 64] bf16 (~225 KB).
//
//   for each tile i of WN tokens of this split:
//     WG1: copy tile i + 1 into the stage tile i - 1 used      (cp.async, during WG0's scores; pages a tile ahead)
//     WG0: S = Q K^T  [64, 64]                                  36 wgmma m64n64k16 over all 576 dims, in registers
//          scaled to base 2, tokens past the end -> -inf
//          m' = m if rowmax S <= m + 8 else rowmax S            (lazy max: P <= 2^8, alpha = 1 on most tiles)
//          alpha = 2^(m - m'); P = 2^(S - m'); l = l alpha + rowsum P; P -> shared memory
//     WG w: O[:, 256w .. 256w + 256) = O alpha + P C          4 wgmma m64n256k16; C = the tile's latent part,
//                                                              read as an MN-major (transposed) operand
//   o = O / l, lse = (m + log2 l) ln 2
//
// Two barriers a tile (tile landed / P ready). Scores cost 2.4 MFLOP a tile on 64 rows whatever H <= 64, so the
// kernel is the same speed from 1 to 64 heads; at 32 heads it stays under the tensor cores' ridge and reads
// close to the HBM rate.
//
// mma.sync kernel (mla_split_kernel): HT = 32 heads, BN = 32 tokens a tile, 8 warps.
//
//   for each tile of BN tokens of this split (cp.async ring, STAGES deep, one page lookup per row):
//     S_w  = Q[:, dims_w] K[:, dims_w]^T         warp w: latent dims [64w, 64w+64) + rope dims [8w, 8w+8);
//                                                its slice of Q stays in registers for the whole split
//     S    = sum_w S_w (shared memory), scaled to base 2, tokens past the end -> -inf
//     m'   = max(m, rowmax S); alpha = 2^(m - m'); P = 2^(S - m'); l = l alpha + rowsum P
//     O[:, cols_w] = O[:, cols_w] alpha + P C[:, cols_w]       warp w: latent columns [64w, 64w+64)
//   o = O / l, lse = (m + log2 l) ln 2
//
// Both products run on mma.sync m16n8k16 (heads as M), operands through ldmatrix; the score and output
// accumulators live in registers (32 + 64 floats a thread).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mla_decode_cuda.h"

namespace {

constexpr int LKV = 512, R = 64, ROW = LKV + R;
constexpr int HT = 32, MT = HT / 16, BN = 32, NT = BN / 8;
constexpr int WARPS = 8, THREADS = WARPS * 32;
constexpr int ROW_S = ROW + 8;    // smem row of a cache tile, in bf16: 1168 B, so ldmatrix's 8 rows hit 8 bank groups
constexpr int SP_S = BN + 8;      // float row of a partial-score tile (conflict-free float2 stores / float4 loads)
constexpr int P_S = BN + 8;       // bf16 row of P (80 B: conflict-free ldmatrix)
constexpr int TPH = THREADS / HT; // softmax threads per head (8), each owning BN / TPH = 4 tokens
constexpr float LN2 = 0.6931471805599453f;

static_assert(LKV == WARPS * 64 && R == WARPS * 8 && BN == TPH * 4, "warp tiling assumes Lkv 512, R 64, 8 warps");

constexpr int TILE_BYTES = BN * ROW_S * 2;
constexpr int smem_bytes(int stages) { return stages * TILE_BYTES + WARPS * HT * SP_S * 4 + HT * P_S * 2 + 2 * HT * 4; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  // src_bytes 0 fills the 16 bytes with zeros (rows past the end: never read from memory)
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d += a b: m16n8k16 (a 4 regs, b 2 regs) and m16n8k8 (a 2 regs, b 1 reg), bf16 in, float32 accumulate
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma8(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b0));
}

// two bf16 of one query row (zero for padded heads) packed as an mma operand register
__device__ __forceinline__ uint32_t q_pair(const __nv_bfloat16* row, int col, bool live) {
  if (!live) return 0u;
  __nv_bfloat162 v;
  v.x = row[col];
  v.y = row[col + 1];
  return *reinterpret_cast<uint32_t*>(&v);
}

// tokens [start, end) of sequence b that split `split` takes, and its tiles of `tile` tokens (the Triton kernel's
// rule: splits are whole tiles, so only a split's last tile can be ragged)
struct SplitRange {
  int start, end, n_tiles;
};
__device__ __forceinline__ SplitRange split_range(const MLASplitArgs& a, int b, int split, int tile) {
  const int seq_len = a.seq_lens[b];
  const int tiles_per_split = ((seq_len + tile - 1) / tile + a.num_splits - 1) / a.num_splits;
  const int start = split * tiles_per_split * tile;
  const int end = min(start + tiles_per_split * tile, seq_len);
  return {start, end, end > start ? (end - start + tile - 1) / tile : 0};
}

template <int STAGES>
__global__ void __launch_bounds__(THREADS, 1) mla_split_kernel(const MLASplitArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t kv_s = smem_addr(smem);                                                // [STAGES][BN][ROW_S] bf16
  float* sp = reinterpret_cast<float*>(smem + STAGES * TILE_BYTES);                   // [WARPS][HT][SP_S]
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(sp + WARPS * HT * SP_S);        // [HT][P_S]
  float* alpha_s = reinterpret_cast<float*>(p_s + HT * P_S);                            // [HT]
  float* inv_l_s = alpha_s + HT;                                                         // [HT]
  const uint32_t p_addr = smem_addr(p_s);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int head0 = blockIdx.x * HT, split = blockIdx.y, b = blockIdx.z;

  const SplitRange range = split_range(a, b, split, BN);
  const int start = range.start, end = range.end, n_tiles = range.n_tiles;

  // this warp's query slice as mma A fragments: rows head0 + 16m + {g, g + 8}
  uint32_t qa[MT][4][4], qr[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = head0 + 16 * m + g + 8 * half;
      const bool live = h < a.heads;
      const __nv_bfloat16* qn = a.q_nope + (live ? (int64_t)b * a.s_qn_b + (int64_t)h * a.s_qn_h : 0);
      const __nv_bfloat16* qp = a.q_pe + (live ? (int64_t)b * a.s_qp_b + (int64_t)h * a.s_qp_h : 0);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int d = 64 * warp + 16 * kk + 2 * c;
        qa[m][kk][half] = q_pair(qn, d, live);         // a0 / a1: columns 2c, 2c+1
        qa[m][kk][2 + half] = q_pair(qn, d + 8, live); // a2 / a3: columns 2c+8, 2c+9
      }
      qr[m][half] = q_pair(qp, 8 * warp + 2 * c, live);
    }
  }

  // loader: thread tid copies row tid / 8 of a tile, 16-byte chunks (tid % 8) + 8 i; one page lookup a row
  const int ld_row = tid >> 3, ld_sub = tid & 7;
  const int* bt_row = a.block_table + (int64_t)b * a.s_bt_b;
  auto page_of = [&](int k) -> int {
    const int t = start + k * BN + ld_row;
    return t < end ? __ldg(bt_row + t / a.tpb) : -1;
  };
  auto issue = [&](int k, int page) {
    const int t = start + k * BN + ld_row;
    const char* src = reinterpret_cast<const char*>(a.kv);
    if (page >= 0) src += ((int64_t)page * a.s_kv_blk + (int64_t)(t % a.tpb) * a.s_kv_tok) * 2;
    const uint32_t dst = kv_s + (k % STAGES) * TILE_BYTES + ld_row * ROW_S * 2 + ld_sub * 16;
#pragma unroll
    for (int i = 0; i < ROW * 2 / 128; ++i) cp_async16(dst + 128 * i, src + ld_sub * 16 + 128 * i, page >= 0 ? 16 : 0);
  };

  // softmax state: thread tid owns head tid / TPH, tokens 4 (tid % TPH) .. + 3 of each tile
  const int sm_h = tid / TPH, sm_j = tid % TPH;
  float m_run = -INFINITY, l_run = 0.f;
  float acc[MT][8][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;

  // ---- partial scores over this warp's dims into sp[warp]: S_w [HT, BN]. Fragments are loaded one k-step
  // ahead of their products (the asm statements keep source order, so the prefetch is written out).
  auto scores = [&](uint32_t tile) {
    float s[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] = 0.f;
    // matrices: (tokens 16np + 0..7 | 8..15) x (dims d0 + 0..7 | 8..15): b0, b1 of n-tiles 2np, 2np + 1
    const int mi = lane >> 3;
    const uint32_t kb_addr = tile + ((((mi >> 1) << 3) + (lane & 7)) * ROW_S + 64 * warp + ((mi & 1) << 3)) * 2;
    uint32_t kb[2][NT / 2][4], rb[4];
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) ldsm_x4(kb[0][np], kb_addr + 16 * np * ROW_S * 2);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kk < 3) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) ldsm_x4(kb[(kk + 1) & 1][np], kb_addr + (16 * np * ROW_S + 16 * (kk + 1)) * 2);
      } else {  // rope dims [LKV + 8w, +8): one k8 step, matrix n = n-tile n
        ldsm_x4(rb, tile + ((8 * (lane >> 3) + (lane & 7)) * ROW_S + LKV + 8 * warp) * 2);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma16(s[m][2 * np], qa[m][kk], kb[kk & 1][np][0], kb[kk & 1][np][1]);
          mma16(s[m][2 * np + 1], qa[m][kk], kb[kk & 1][np][2], kb[kk & 1][np][3]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n) mma8(s[m][n], qr[m], rb[n]);
    float* spw = sp + warp * HT * SP_S;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int h = 16 * m + g, t = 8 * n + 2 * c;
        *reinterpret_cast<float2*>(spw + h * SP_S + t) = make_float2(s[m][n][0], s[m][n][1]);
        *reinterpret_cast<float2*>(spw + (h + 8) * SP_S + t) = make_float2(s[m][n][2], s[m][n][3]);
      }
  };

  // ---- online softmax (base 2) of head sm_h over its 4 tokens of tile i; the row max across the head's 8 lanes
  auto softmax = [&](int i) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(sp + (w * HT + sm_h) * SP_S + 4 * sm_j);
      v.x += x.x; v.y += x.y; v.z += x.z; v.w += x.w;
    }
    float sc[4] = {v.x, v.y, v.z, v.w};
    const int t0 = start + i * BN + 4 * sm_j;
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      sc[q] = t0 + q < end ? sc[q] * a.qk_scale : -INFINITY;
      mx = fmaxf(mx, sc[q]);
    }
#pragma unroll
    for (int o = 1; o < TPH; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m_run, mx);  // finite: every tile holds a live token
    const float alpha = exp2f(m_run - m_new);
    float p[4], sum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      p[q] = exp2f(sc[q] - m_new);
      sum += p[q];
    }
    l_run = l_run * alpha + sum;  // this thread's tokens only; the head's lanes are summed at the end
    m_run = m_new;
    __nv_bfloat162 p01 = __floats2bfloat162_rn(p[0], p[1]), p23 = __floats2bfloat162_rn(p[2], p[3]);
    uint2 pk;
    pk.x = *reinterpret_cast<uint32_t*>(&p01);
    pk.y = *reinterpret_cast<uint32_t*>(&p23);
    *reinterpret_cast<uint2*>(p_s + sm_h * P_S + 4 * sm_j) = pk;
    if (sm_j == 0) alpha_s[sm_h] = alpha;
  };

  // ---- O[:, 64w .. 64w + 64) = O alpha + P C; both k-steps' fragments loaded before the products
  auto pv = [&](uint32_t tile) {
    uint32_t pa[BN / 16][MT][4], cb[BN / 16][4][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int m = 0; m < MT; ++m)  // rows 16m + (lane & 15), tokens 16kk + 8 (lane >> 4)
        ldsm_x4(pa[kk][m], p_addr + ((16 * m + (lane & 15)) * P_S + 16 * kk + ((lane >> 4) << 3)) * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        // matrices (transposed): (tokens 16kk + 0..7 | 8..15) x (columns c0 + 0..7 | 8..15)
        const int tok = 16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int col = 64 * warp + 16 * np + ((lane >> 4) << 3);
        ldsm_x4_t(cb[kk][np], tile + (tok * ROW_S + col) * 2);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float a0 = alpha_s[16 * m + g], a1 = alpha_s[16 * m + g + 8];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        acc[m][n][0] *= a0; acc[m][n][1] *= a0;
        acc[m][n][2] *= a1; acc[m][n][3] *= a1;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int np = 0; np < 4; ++np)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma16(acc[m][2 * np], pa[kk][m], cb[kk][np][0], cb[kk][np][1]);
          mma16(acc[m][2 * np + 1], pa[kk][m], cb[kk][np][2], cb[kk][np][3]);
        }
  };

  // ---- the pipeline: two barriers a tile. Tile k is copied into stage k % STAGES, STAGES - 1 tiles ahead of
  // its scores; scores of tile i + 1 run beside the output products of tile i, between the same barriers.
  auto stage = [&](int k) { return kv_s + (k % STAGES) * TILE_BYTES; };
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < n_tiles) issue(k, page_of(k));
    cp_async_commit();  // group k holds tile k (empty past the end), so waits count tiles
  }
  int next_page = STAGES - 1 < n_tiles ? page_of(STAGES - 1) : -1;  // looked up a tile ahead of its copy
  if (n_tiles > 0) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile 0 landed
    scores(stage(0));
    __syncthreads();
  }
  for (int i = 0; i < n_tiles; ++i) {
    // stage (i - 1) % STAGES: tile i - 1's products finished before the last barrier
    if (i + STAGES - 1 < n_tiles) issue(i + STAGES - 1, next_page);
    cp_async_commit();
    if (i + STAGES < n_tiles) next_page = page_of(i + STAGES);
    softmax(i);
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // P and alpha of tile i visible, sp free, tile i + 1 landed
    pv(stage(i));
    if (i + 1 < n_tiles) scores(stage(i + 1));
    __syncthreads();  // sp of tile i + 1 visible, P free, stage i free
  }
  // ---- epilogue: l over the head's lanes, o = O / l, lse = (m + log2 l) ln 2; empty split: o = 0, lse = -inf
#pragma unroll
  for (int o = 1; o < TPH; o <<= 1) l_run += __shfl_xor_sync(0xffffffffu, l_run, o);
  if (sm_j == 0) {
    inv_l_s[sm_h] = l_run > 0.f ? 1.f / l_run : 0.f;
    if (head0 + sm_h < a.heads)
      a.lse[(int64_t)b * a.s_l_b + (int64_t)(head0 + sm_h) * a.s_l_h + (int64_t)split * a.s_l_s] =
          l_run > 0.f ? (m_run + log2f(l_run)) * LN2 : -INFINITY;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int hl = 16 * m + g + 8 * half, h = head0 + hl;
      if (h >= a.heads) continue;
      const float il = inv_l_s[hl];
      const int64_t row = (int64_t)b * a.s_o_b + (int64_t)h * a.s_o_h + (int64_t)split * a.s_o_s;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = 64 * warp + 8 * n + 2 * c;
        const float x = acc[m][n][2 * half] * il, y = acc[m][n][2 * half + 1] * il;
        if (a.o_direct)
          *reinterpret_cast<__nv_bfloat162*>(a.o_direct + row + col) = __floats2bfloat162_rn(x, y);
        else
          *reinterpret_cast<float2*>(a.o_part + row + col) = make_float2(x, y);
      }
    }
}

// ================================================================================================
// Hopper kernel (sm_90a): wgmma, 64 head rows x 64-token tiles, two warpgroups
// ================================================================================================
constexpr int WH = 64, WN = 64, WTHREADS = 256;   // head rows (M of both products), tokens a tile, threads
constexpr int WBLK = WN * 128;                    // one 64-dim column block of a tile: 64 rows of 128 B (8 KB)
constexpr int WTILE = 9 * WBLK;                   // a tile (or Q): 9 column blocks = 576 dims, 73,728 B
constexpr int W_Q = 0, W_KV = WTILE, W_P = 3 * WTILE, W_ALPHA = W_P + WH * 128, W_L = W_ALPHA + WH * 4;
constexpr int W_SMEM = W_L + WH * 4 + 1024;       // + slack to align the base to the 1024-byte swizzle atom

static_assert(W_Q == 0 && W_KV == WTILE && W_SMEM <= 227 * 1024, "Q, two stages and P fit in shared memory");

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the helpers below are sm_90a's alone
constexpr float RESCALE = 8.f;  // base-2 headroom of the lazily moved running max

// byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a [rows][128 B] block under the 128-byte
// swizzle: chunk ^ (row % 8), the pattern wgmma's descriptors with swizzle mode 1 read
__device__ __forceinline__ uint32_t swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// shared-memory matrix descriptor: start, leading / stride byte offsets (16-byte units), 128-byte swizzle
__device__ __forceinline__ uint64_t sdesc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// pins accumulator registers in place around the asynchronous products (no reads hoisted above the wait)
template <int N>
__device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[64 x 64] += A[64 x 16] B[16 x 64], both K-major in shared memory
__device__ __forceinline__ void wgmma_n64(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db));
}

#define WG_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
// d[64 x 256] += A[64 x 16] (K-major) B[16 x 256] (MN-major: trans-b), both in shared memory
__device__ __forceinline__ void wgmma_n256(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56), WG_F8(64), WG_F8(72),
        WG_F8(80), WG_F8(88), WG_F8(96), WG_F8(104), WG_F8(112), WG_F8(120)
      : "l"(da), "l"(db));
}
#undef WG_F8
#endif

// Accumulator layout of both products (m64nN, f32): thread t of a warpgroup holds rows r0 = 16 (t / 32) +
// (t % 32) / 4 and r0 + 8; d[4j + e] is row r0 + 8 (e / 2), column 8j + 2 (t % 4) + e % 2.
__global__ void __launch_bounds__(WTHREADS, 1) mla_split_kernel_sm90(const MLASplitArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  const uint32_t q_s = base + W_Q, p_s = base + W_P;
  float* alpha_s = reinterpret_cast<float*>(smem + W_ALPHA);
  float* l_s = reinterpret_cast<float*>(smem + W_L);

  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127, lane = tid & 31, c = lane & 3;
  const int r0 = 16 * (t >> 5) + (lane >> 2);  // this thread's accumulator rows r0, r0 + 8
  const int head0 = blockIdx.x * WH, split = blockIdx.y, b = blockIdx.z;

  const SplitRange range = split_range(a, b, split, WN);
  const int start = range.start, end = range.end, n_tiles = range.n_tiles;

  {  // Q [64 rows, 576] into the swizzled layout, rows past H zeros: thread tid takes 16-byte chunk tid % 8 of
     // each column block of rows tid / 8 and tid / 8 + 32; all loads first, then the stores
    const int row = tid >> 3, sub = tid & 7;
    uint32_t v[2][9][4];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int h = head0 + row + 32 * rr;
#pragma unroll
      for (int kb = 0; kb < 9; ++kb) {
        const __nv_bfloat16* src = kb < 8 ? a.q_nope + (int64_t)b * a.s_qn_b + (int64_t)h * a.s_qn_h + 64 * kb
                                          : a.q_pe + (int64_t)b * a.s_qp_b + (int64_t)h * a.s_qp_h;
#pragma unroll
        for (int e = 0; e < 4; ++e) v[rr][kb][e] = q_pair(src, 8 * sub + 2 * e, h < a.heads);
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
#pragma unroll
      for (int kb = 0; kb < 9; ++kb)
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(q_s + kb * WBLK + swz(row + 32 * rr, sub)),
                     "r"(v[rr][kb][0]), "r"(v[rr][kb][1]), "r"(v[rr][kb][2]), "r"(v[rr][kb][3]));
    proxy_fence();  // Q read by the tensor cores after the first barrier
  }

  // ---- copies, by warpgroup 1 alone (it waits while warpgroup 0 computes the scores): thread t moves 16-byte
  // chunk t % 8 of each 128-byte column block of rows t / 8 + 16 rr; the pages are looked up a tile ahead
  const int ld_row = t >> 3, ld_sub = t & 7;
  const int* bt_row = a.block_table + (int64_t)b * a.s_bt_b;
  int page[4];
  auto lookup = [&](int k) {
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const int tok = start + k * WN + ld_row + 16 * rr;
      page[rr] = tok < end ? __ldg(bt_row + tok / a.tpb) : -1;
    }
  };
  auto issue = [&](int k) {  // tile k into stage k % 2, zeros past the end; one commit group per tile
    const uint32_t dst = base + W_KV + (k & 1) * WTILE;
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const int row = ld_row + 16 * rr, tok = start + k * WN + row;
      const bool live = page[rr] >= 0;
      const char* src = reinterpret_cast<const char*>(a.kv);
      if (live) src += ((int64_t)page[rr] * a.s_kv_blk + (int64_t)(tok % a.tpb) * a.s_kv_tok) * 2 + ld_sub * 16;
#pragma unroll
      for (int kb = 0; kb < 9; ++kb)
        cp_async16(dst + kb * WBLK + swz(row, ld_sub), src + (live ? 128 * kb : 0), live ? 16 : 0);
    }
    cp_async_commit();
  };
  if (wg == 1 && n_tiles > 0) {
    lookup(0);
    issue(0);
    if (n_tiles > 1) lookup(1);
  }

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // warpgroup 0: running max / sum of rows r0, r0 + 8
  // Two barriers a tile. Tile i + 1 is copied (into the stage tile i - 1 used) while tile i is computed.
  for (int i = 0; i < n_tiles; ++i) {
    const uint32_t kv = base + W_KV + (i & 1) * WTILE;
    if (wg == 1) {
      cp_async_wait<0>();  // tile i landed (the only group in flight)
      proxy_fence();       // the copies visible to the tensor cores' reads
    }
    __syncthreads();  // tile i visible; the products of tile i - 1 done, so its stage and P are free
    if (wg == 0) {  // ---- S = Q K^T over all 576 dims, then the online softmax in registers
      float s[32];
#pragma unroll
      for (int e = 0; e < 32; ++e) s[e] = 0.f;
      reg_fence(s);
      wg_fence();
#pragma unroll
      for (int ks = 0; ks < 36; ++ks) {
        const uint32_t off = (ks >> 2) * WBLK + (ks & 3) * 32;
        wgmma_n64(s, sdesc(q_s + off, 16, 1024), sdesc(kv + off, 16, 1024));
      }
      wg_commit();
      wg_wait0();
      reg_fence(s);
      const int tok0 = start + i * WN + 2 * c;
      const bool ragged = start + (i + 1) * WN > end;  // only a split's last tile holds tokens past the end
      float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool live = !ragged || tok0 + 8 * j + e < end;
          s[4 * j + e] = live ? s[4 * j + e] * a.qk_scale : -INFINITY;
          s[4 * j + 2 + e] = live ? s[4 * j + 2 + e] * a.qk_scale : -INFINITY;
          x0 = fmaxf(x0, s[4 * j + e]);
          x1 = fmaxf(x1, s[4 * j + 2 + e]);
        }
#pragma unroll
      for (int sh = 1; sh < 4; sh <<= 1) {
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, sh));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, sh));
      }
      // the running max moves only when a score passes it by more than RESCALE (finite: every tile holds a live
      // token): P <= 2^RESCALE stays exact in float32 and bf16's range, and most tiles keep alpha = 1, so the
      // output rescale below is skipped
      const float n0 = x0 > m0 + RESCALE ? x0 : m0, n1 = x1 > m1 + RESCALE ? x1 : m1;
      const float al0 = exp2f(m0 - n0), al1 = exp2f(m1 - n1);
      m0 = n0, m1 = n1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float p0 = exp2f(s[4 * j] - n0), p1 = exp2f(s[4 * j + 1] - n0);
        const float p2 = exp2f(s[4 * j + 2] - n1), p3 = exp2f(s[4 * j + 3] - n1);
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        __nv_bfloat162 u = __floats2bfloat162_rn(p0, p1), w = __floats2bfloat162_rn(p2, p3);
        const uint32_t pu = *reinterpret_cast<uint32_t*>(&u), pw = *reinterpret_cast<uint32_t*>(&w);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(p_s + swz(r0, j) + 4 * c), "r"(pu));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(p_s + swz(r0 + 8, j) + 4 * c), "r"(pw));
      }
      l0 = l0 * al0 + sum0;  // this thread's tokens; the row's 4 lanes are summed at the end
      l1 = l1 * al1 + sum1;
      if (c == 0) alpha_s[r0] = al0, alpha_s[r0 + 8] = al1;
      proxy_fence();  // P read by the tensor cores next
    } else if (i + 1 < n_tiles) {  // ---- tile i + 1 into the free stage
      issue(i + 1);
      if (i + 2 < n_tiles) lookup(i + 2);
    }
    __syncthreads();  // P and alpha of tile i visible
    {  // ---- O[:, 256 wg .. + 256) = O alpha + P C: C is the tile's latent part read as an MN-major operand
      const float al0 = alpha_s[r0], al1 = alpha_s[r0 + 8];
      if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {  // this warp's 16 rows: any max moved
#pragma unroll
        for (int j = 0; j < 32; ++j) o[4 * j] *= al0, o[4 * j + 1] *= al0, o[4 * j + 2] *= al1, o[4 * j + 3] *= al1;
      }
      reg_fence(o);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_n256(o, sdesc(p_s + 32 * kk, 16, 1024), sdesc(kv + 4 * wg * WBLK + 16 * kk * 128, WBLK, 1024));
      wg_commit();
      wg_wait0();
      reg_fence(o);
    }
  }
  // ---- epilogue: l over the row's 4 lanes, o = O / l, lse = (m + log2 l) ln 2; empty split: o = 0, lse = -inf
  if (wg == 0) {
#pragma unroll
    for (int sh = 1; sh < 4; sh <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
      l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    if (c == 0) {
      l_s[r0] = l0 > 0.f ? 1.f / l0 : 0.f;
      l_s[r0 + 8] = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int h = head0 + r0 + 8 * half;
        const float l = half ? l1 : l0, m = half ? m1 : m0;
        if (h < a.heads)
          a.lse[(int64_t)b * a.s_l_b + (int64_t)h * a.s_l_h + (int64_t)split * a.s_l_s] =
              l > 0.f ? (m + log2f(l)) * LN2 : -INFINITY;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int h = head0 + r0 + 8 * half;
    if (h >= a.heads) continue;
    const float il = l_s[r0 + 8 * half];
    const int64_t row = (int64_t)b * a.s_o_b + (int64_t)h * a.s_o_h + (int64_t)split * a.s_o_s;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = 256 * wg + 8 * j + 2 * c;
      const float x = o[4 * j + 2 * half] * il, y = o[4 * j + 2 * half + 1] * il;
      if (a.o_direct)
        *reinterpret_cast<__nv_bfloat162*>(a.o_direct + row + col) = __floats2bfloat162_rn(x, y);
      else
        *reinterpret_cast<float2*>(a.o_part + row + col) = make_float2(x, y);
    }
  }
#endif
}

// One launch, grid (head tiles, splits, B). The dynamic shared-memory limit is raised per call: the attribute
// belongs to the device current now (one process may drive several).
const char* launch(void (*kernel)(MLASplitArgs), int heads_per_tile, int threads, int smem, const MLASplitArgs& a,
                   cudaStream_t stream) {
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return cudaGetErrorString(attr);
  const dim3 grid((a.heads + heads_per_tile - 1) / heads_per_tile, a.num_splits, a.batch);
  kernel<<<grid, threads, smem, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int STAGES>
const char* launch_mma_sync(const MLASplitArgs& a, cudaStream_t stream) {
  return launch(mla_split_kernel<STAGES>, HT, THREADS, smem_bytes(STAGES), a, stream);
}

}  // namespace

const char* mla_split_launch(const MLASplitArgs& a, bool wgmma, int stages, int device, void* stream) {
  int current = -1;
  cudaGetDevice(&current);
  if (current != device) cudaSetDevice(device);  // the inputs' device for the launch, restored after
  auto s = static_cast<cudaStream_t>(stream);
  const char* err = wgmma ? (stages == 2 ? launch(mla_split_kernel_sm90, WH, WTHREADS, W_SMEM, a, s)
                                          : "the wgmma kernel has 2 stages")
                    : stages == 3 ? launch_mma_sync<3>(a, s)
                    : stages == 4 ? launch_mma_sync<4>(a, s)
                    : stages == 5 ? launch_mma_sync<5>(a, s)
                                  : "stages must be 3, 4 or 5";
  if (current != device) cudaSetDevice(current);
  return err;
}

int mla_split_smem_bytes(bool wgmma, int stages) { return wgmma ? W_SMEM : smem_bytes(stages); }
