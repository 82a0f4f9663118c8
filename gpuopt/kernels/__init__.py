"""Device code: ``@triton.jit`` kernels, the equations they implement, and each optimizer's
algorithm spec (installed as ``gpuopt.kernels``).

Nothing here imports from ``gpuopt``: the host (``gpuopt/``) calls down into this package, never
the reverse. Grids, occupancy, launches and allocation are the host's.
"""
