"""Counter-based randomness, bit-exact with Triton's ``tl.randint4x`` (Philox 4x32, 10 rounds).

The Triton samplers draw in-kernel from (seed, offset); this is the same stream in torch, so that
kernel and reference can be compared on the same draws.
"""

from __future__ import annotations

import torch


_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant and a tensor of 32-bit values,
    in int64 arithmetic without overflow (16-bit halves)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p = b_lo * a_lo
    mid = b_lo * a_hi + b_hi * a_lo
    hi = b_hi * a_hi + ((mid + (p >> 16)) >> 16)
    lo = (p + ((mid & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32(seed: int, offset: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Four int64 tensors of uint32 values: ``tl.randint4x(seed, offset)`` for int64 offsets."""
    c0 = offset & _M32
    c1 = offset >> 32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offset: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """float64 uniforms in [0, 1) at counters ``offset + arange(numel)`` (row-major): two 32-bit
    words give 53 bits, exact in float64."""
    numel = 1
    for s in shape:
        numel *= s
    counters = torch.arange(numel, dtype=torch.int64, device=device).add_(offset).view(shape)
    r0, r1, _, _ = philox4x32(seed, counters)
    return ((r0 >> 5) * (1 << 26) + (r1 >> 6)).double() * (2.0 ** -53)


def philox_below(seed: int, offset: int, shape: tuple[int, ...], high: int | torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    """int64 draws uniform in ``[0, high)`` at counters ``offset + arange(numel)`` (row-major).

    Two 32-bit words give a 53-bit uniform ``u`` in [0, 1) (exact in float64); the draw is
    ``floor(u * high)``, whose bias is below ``high / 2**53``. ``high`` may be a device tensor.
    """
    return (philox_uniform(seed, offset, shape, device) * high).long()
