"""Triton kernels for spin-ray's hot paths, each with a plain torch reference beside it.

Installed as `spin_ray.kernels`. The engine uses the Triton kernels on CUDA and the references
on the CPU; tests compare the two with `TRITON_INTERPRET=1`.
"""
