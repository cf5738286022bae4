"""kvq Triton kernels (imported as ``kvq_kernels``)."""
