// The split kernel's arguments, shared by kernels/mla_decode.cu and its torch binding (no torch or CUDA types).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

struct MLASplitArgs {
  const __nv_bfloat16* q_nope;  // [B, H, 512], last dim contiguous
  const __nv_bfloat16* q_pe;    // [B, H, 64]
  const __nv_bfloat16* kv;      // [blocks, tpb, 576], rows 16-byte aligned
  const int* block_table;       // [B, max_blocks] int32
  const int* seq_lens;          // [B] int32
  float* o_part;                // [B, H, splits, 512] float32, or null when o_direct is set
  __nv_bfloat16* o_direct;      // [B, H, 512] bf16 (one split: the final output), or null
  float* lse;                   // [B, H, splits] (or [B, H])
  float qk_scale;               // scale * log2(e)
  int batch, heads, num_splits, tpb;
  int64_t s_qn_b, s_qn_h, s_qp_b, s_qp_h, s_kv_blk, s_kv_tok, s_bt_b;
  int64_t s_o_b, s_o_h, s_o_s, s_l_b, s_l_h, s_l_s;  // of whichever output is written
};

// Launches a split kernel on ``device``'s ``stream`` (a cudaStream_t): the Hopper wgmma kernel (2 stages) or the
// mma.sync kernel (3, 4 or 5 stages); returns null or the CUDA error's text.
const char* mla_split_launch(const MLASplitArgs& args, bool wgmma, int stages, int device, void* stream);
int mla_split_smem_bytes(bool wgmma, int stages);
