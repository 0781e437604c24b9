"""The environment every GPU process of this project runs with (no torch import: the noxfile reads it too).

NVLink multicast stays off in NCCL, PyTorch's symmetric memory and NVSHMEM: on shared multi-GPU hosts a program
that uses it can put every GPU of the host out of service.
"""

GPU_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
