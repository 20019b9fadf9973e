"""The camera: expected photo-electrons to 16-bit counts with shot noise, read noise, gain,
offset and saturation, as an sCMOS camera delivers them."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F32 = np.float32


def read_out(electrons: NDArray[np.float32], *, read_noise_e: float, e_per_adu: float,
             offset_adu: float, full_well_e: float, bit_depth: int,
             rng: np.random.Generator) -> NDArray[np.uint16]:
    """Shot noise, saturation, read noise, gain and offset: expected e- to camera counts.

    Shot plus read noise is drawn as one skewed Gaussian (Cornish-Fisher: mean e, variance
    e + r^2, the skewness of the Poisson part), because an exact Poisson draw costs five
    times more on a large frame and read noise hides the discreteness of counts anyway.
    With a camera of almost no read noise (< 0.5 e-) counts below 30 e- are exact Poisson.
    """
    e = np.maximum(electrons, 0, dtype=F32)
    z = rng.standard_normal(e.shape, dtype=F32)
    var = e + F32(max(read_noise_e ** 2, 1e-6))
    counts = np.multiply(z, z)                  # in-place steps: this runs on every frame
    counts -= 1
    counts *= e
    counts /= var
    counts *= F32(1 / 6)
    np.sqrt(var, out=var)
    var *= z
    counts += var
    counts += e
    if read_noise_e < 0.5:
        low = e < 30
        if low.any():
            counts[low] = rng.poisson(e[low]).astype(F32) + F32(read_noise_e) * z[low]
    np.minimum(counts, F32(full_well_e), out=counts)
    counts *= F32(1 / e_per_adu)
    counts += F32(offset_adu + 0.5)             # + 0.5 and truncation round to nearest
    np.clip(counts, 0, 2 ** bit_depth - 1, out=counts)
    return counts.astype(np.uint16)


__all__ = ["read_out"]
