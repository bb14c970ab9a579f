"""Triton kernels of gpubuffers, installed as ``gpubuffers.kernels``.

Only :mod:`gpubuffers.ops` imports this package, and only when a CUDA tensor first needs a
kernel; importing :mod:`gpubuffers` never imports triton.
"""
