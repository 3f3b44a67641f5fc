"""GPU backends of the kernels: flashinfer attention and the Triton sparse GEMV, imported only for CUDA tensors."""
