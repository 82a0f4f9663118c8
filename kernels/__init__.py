"""Device code: ``@triton.jit`` kernels and their thin launchers (installed as ``gpuopt.kernels``).

Nothing here imports from ``gpuopt``: the host API calls down into this package, never the reverse.
Launchers write into the tensors they are given and allocate nothing.
"""
