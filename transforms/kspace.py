"""k-space truncation: the LQ input of the ``mri_sr`` task (AMIR / TAT / DiffCode, MRI 4x super-resolution).

The papers degrade IXI T2 slices by keeping only the central 6.25 % of k-space (``H/4 x W/4``), filling
the rest with zeros and taking the magnitude of the inverse FFT: a low-resolution image on the same grid.

Centre convention (centred k-space, as :func:`monai.data.fft_utils.fftn_centered` returns it): along an
axis of length ``n`` the zero frequency sits at index ``n // 2``; keeping a fraction ``f`` keeps
``m = max(1, floor(f n + 1/2))`` samples, indices ``[n // 2 - m // 2, n // 2 - m // 2 + m)``, i.e. the
frequencies ``-(m // 2) .. m - m // 2 - 1`` (in cycles per field of view). For even ``m`` that window has
one more negative frequency than positive ones (e.g. ``n = 256``, ``f = 1/4``: ``-32 .. 31``), as does
cropping ``[n/2 - m/2, n/2 + m/2)``; for odd ``m`` it is symmetric. Odd and even ``n`` follow the same rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.networks.blocks.fft_utils_t import fftn_centered_t, ifftn_centered_t
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

__all__ = ["KSpaceTruncate", "KSpaceTruncated", "central_window", "kspace_mask", "kspace_truncate"]


def central_window(size: int, fraction: float) -> slice:
    """Indices of the central ``fraction`` of a centred k-space axis of length ``size`` (module docstring)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {fraction}")
    kept = max(1, min(size, int(fraction * size + 0.5)))
    start = size // 2 - kept // 2
    return slice(start, start + kept)


def kspace_mask(shape: Sequence[int], keep_fraction: float | Sequence[float]) -> torch.Tensor:
    """Boolean mask over centred k-space of ``shape`` (the last ``len(shape)`` axes), True where kept."""
    fractions = ensure_tuple_rep(keep_fraction, len(shape))
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    mask[tuple(central_window(n, f) for n, f in zip(shape, fractions))] = True
    return mask


def _fractions(keep_fraction: float | Sequence[float], spatial_dims: int) -> tuple[float, ...]:
    if isinstance(keep_fraction, Sequence) and len(keep_fraction) != spatial_dims:
        raise ValueError(f"keep_fraction needs one value per spatial axis ({spatial_dims}), got {keep_fraction}")
    fractions = tuple(float(f) for f in ensure_tuple_rep(keep_fraction, spatial_dims))
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    return fractions


def kspace_truncate(
    img: NdarrayOrTensor,
    keep_fraction: float | Sequence[float] = 0.25,
    spatial_dims: int = 2,
    magnitude: bool = True,
) -> NdarrayOrTensor:
    """Keep the central ``keep_fraction`` of k-space per axis, zero-fill, inverse FFT (and magnitude).

    Args:
        img: channel-first image, ``(C, H, W)`` or ``(C, H, W, D)`` (numpy or torch, real-valued).
        keep_fraction: kept fraction per axis (float, or one per spatial axis); 0.25 keeps ``H/4 x W/4``,
            the papers' central 6.25 %.
        spatial_dims: 2: every ``(H, W)`` slice is truncated on its own (slices along the last axis of a
            ``(C, H, W, D)`` volume); 3: the ``(H, W, D)`` volume is truncated in 3-D k-space.
        magnitude: return ``|ifft|`` (same real dtype as the input, float32 for integer input); False
            returns the complex image (a complex tensor or array), useful for checking the k-space.

    Returns:
        same shape and array type as ``img``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    fractions = _fractions(keep_fraction, spatial_dims)
    data = convert_to_tensor(img, track_meta=False)
    if data.is_complex():
        raise ValueError("img must be real-valued (a magnitude image)")
    if data.ndim not in (3, 4) or (spatial_dims == 3 and data.ndim != 4):
        wanted = "(C, H, W) or (C, H, W, D)" if spatial_dims == 2 else "(C, H, W, D)"
        raise ValueError(f"img must be channel-first {wanted} for spatial_dims={spatial_dims}, got {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("img contains NaN or Inf values")
    real_dtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
    data = data.to(real_dtype)

    slice_stack = spatial_dims == 2 and data.ndim == 4
    work = data.permute(0, 3, 1, 2) if slice_stack else data  # (C, D, H, W): 2-D FFT over the last two axes
    kspace = fftn_centered_t(work, spatial_dims=spatial_dims, is_complex=False)  # (..., 2) real/imag
    mask = kspace_mask(work.shape[-spatial_dims:], fractions).to(kspace.device)
    kspace = kspace * mask[..., None]
    image = torch.view_as_complex(ifftn_centered_t(kspace, spatial_dims=spatial_dims, is_complex=True).contiguous())
    out = image.abs() if magnitude else image
    if slice_stack:
        out = out.permute(0, 2, 3, 1)
    if not magnitude:
        return out if isinstance(img, torch.Tensor) else out.numpy()
    return convert_to_dst_type(out.contiguous(), img, dtype=real_dtype)[0]


class KSpaceTruncate(Transform):
    """Simulate a low-resolution MRI slice by k-space truncation (:func:`kspace_truncate`).

    Args:
        keep_fraction: kept fraction of k-space per axis (0.25: the papers' central 6.25 %).
        spatial_dims: 2 (slice by slice) or 3 (volume k-space).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, keep_fraction: float | Sequence[float] = 0.25, spatial_dims: int = 2) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.keep_fraction = _fractions(keep_fraction, spatial_dims)
        self.spatial_dims = spatial_dims

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        return kspace_truncate(img, self.keep_fraction, self.spatial_dims)


class KSpaceTruncated(MapTransform):
    """Dictionary version of :class:`KSpaceTruncate`.

    Args:
        keys: keys of the images to degrade.
        output_keys: where to write the results (default: overwrite ``keys``); when given, the input is
            kept, e.g. ``KSpaceTruncated(keys="hq", output_keys="lq")``.
        keep_fraction: see :class:`KSpaceTruncate`.
        spatial_dims: see :class:`KSpaceTruncate`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = KSpaceTruncate.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        keep_fraction: float | Sequence[float] = 0.25,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys is not None else self.keys
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys must match keys in length, got {self.output_keys} for {self.keys}")
        self.truncate = KSpaceTruncate(keep_fraction, spatial_dims)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            try:
                d[out_key] = self.truncate(d[key])
            except ValueError as err:
                raise ValueError(f"KSpaceTruncated, key {key!r}: {err}") from err
        return d
