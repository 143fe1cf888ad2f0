"""Test helpers for comparisons that must not depend on the last bits of floating-point rounding.

CI machines differ (Intel Xeon, AMD EPYC with AVX-512): two code paths, two kernels or two CPUs compute the same float
result with different rounding. A test compares such results with a tolerance, and an argmax only where it is not a
near-tie; it simulates another CPU's rounding with `ulp_noise`.
"""

from __future__ import annotations

import torch


def ulp_noise(values: torch.Tensor, seed: int, ulps: float = 4.0) -> torch.Tensor:
    """`values` times (1 + u), u uniform in +-ulps * eps of their dtype: the rounding another CPU might give."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.finfo(values.dtype).eps
    return values * (1 + ulps * eps * (torch.rand(values.shape, generator=generator, dtype=values.dtype) * 2 - 1))


def assert_argmax_up_to_ties(indices, reference: torch.Tensor, dim: int, atol: float) -> None:
    """Each of `indices` (tensor or array) picks a maximum of `reference` along `dim`, up to `atol`.

    That is the plain argmax wherever the two largest values differ by more than `atol`; where they are closer (a
    near-tie that rounding decides) either index passes. The failure message gives the numbers.
    """
    indices = torch.as_tensor(indices, device=reference.device).long()
    picked = reference.gather(dim, indices.unsqueeze(dim)).squeeze(dim)
    shortfall = (reference.amax(dim) - picked).double()
    wrong = shortfall > atol
    assert not wrong.any(), (
        f"argmax differs beyond a near-tie at {int(wrong.sum())} of {wrong.numel()} places: the picked value is up to"
        f" {shortfall.max().item():.3g} below the maximum (atol {atol:g}); first at {wrong.nonzero()[0].tolist()}"
    )
