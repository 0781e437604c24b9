// Torch binding of kernels/mla_decode.cu (built by kernels/mla_decode.py through torch.utils.cpp_extension).
// Checks what the kernel assumes and passes pointers and strides; kernels/mla_decode.py's wrapper validates
// the call, allocates the outputs and passes the current stream (so this file needs no CUDA headers).
#include <torch/extension.h>

#include "mla_decode_cuda.h"

namespace {

const __nv_bfloat16* bf16(const torch::Tensor& t) {
  return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

void split(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
           const torch::Tensor& block_table, const torch::Tensor& seq_lens, const torch::Tensor& o,
           const torch::Tensor& lse, double qk_scale, int64_t num_splits, bool wgmma, int64_t stages, int64_t stream) {
  TORCH_CHECK(kv.is_cuda() && kv.scalar_type() == at::kBFloat16 && kv.dim() == 3 && kv.size(2) == 576 &&
                  kv.stride(2) == 1 && kv.stride(0) % 8 == 0 && kv.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0,
              "mla_decode cuda: kv_cache must be bf16 [blocks, T, 576] with 16-byte aligned rows");
  TORCH_CHECK(q_nope.scalar_type() == at::kBFloat16 && q_pe.scalar_type() == at::kBFloat16 && q_nope.size(2) == 512 &&
                  q_pe.size(2) == 64 && q_nope.stride(2) == 1 && q_pe.stride(2) == 1,
              "mla_decode cuda: q_nope_abs [B, H, 512] and q_pe [B, H, 64] bf16, last dims contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "mla_decode cuda: block_table and seq_lens must be int32");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "mla_decode cuda: lse must be float32");
  const bool direct = num_splits == 1;
  TORCH_CHECK(o.scalar_type() == (direct ? at::kBFloat16 : at::kFloat) && o.stride(-1) == 1 &&
                  o.dim() == (direct ? 3 : 4) && lse.dim() == (direct ? 2 : 3),
              "mla_decode cuda: o must be bf16 [B, H, 512] for one split, float32 [B, H, splits, 512] otherwise");
  MLASplitArgs a{};
  a.q_nope = bf16(q_nope);
  a.q_pe = bf16(q_pe);
  a.kv = bf16(kv);
  a.block_table = block_table.data_ptr<int>();
  a.seq_lens = seq_lens.data_ptr<int>();
  if (direct)
    a.o_direct = reinterpret_cast<__nv_bfloat16*>(o.data_ptr<at::BFloat16>());
  else
    a.o_part = o.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.qk_scale = static_cast<float>(qk_scale);
  a.batch = static_cast<int>(q_nope.size(0));
  a.heads = static_cast<int>(q_nope.size(1));
  a.num_splits = static_cast<int>(num_splits);
  a.tpb = static_cast<int>(kv.size(1));
  a.s_qn_b = q_nope.stride(0), a.s_qn_h = q_nope.stride(1);
  a.s_qp_b = q_pe.stride(0), a.s_qp_h = q_pe.stride(1);
  a.s_kv_blk = kv.stride(0), a.s_kv_tok = kv.stride(1);
  a.s_bt_b = block_table.stride(0);
  a.s_o_b = o.stride(0), a.s_o_h = o.stride(1), a.s_o_s = direct ? 0 : o.stride(2);
  a.s_l_b = lse.stride(0), a.s_l_h = lse.stride(1), a.s_l_s = direct ? 0 : lse.stride(2);
  const char* err =
      mla_split_launch(a, wgmma, static_cast<int>(stages), kv.get_device(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "mla_decode cuda: launch failed: ", err ? err : "");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("split", &split, "mla_decode's split kernel (kernels/mla_decode.cu)");
  m.def("smem_bytes", &mla_split_smem_bytes, "dynamic shared memory of a split kernel (wgmma, pipeline depth)");
}
