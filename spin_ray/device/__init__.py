"""Device helpers every floor shares (the lowest floor but the kernels): host/device transfers
that never make the host wait, persistent step buffers for CUDA graphs, phase timing by CUDA
events."""
