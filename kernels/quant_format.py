"""Packed int8 / int4 weights: the storage format the quantized kernels read, and its plain dequantisation.

A weight W [..., N, K] (N output features, K input features; leading dimensions stack experts) is stored as
* int8: `data` int8 [..., N, K], `scale` float32 [..., N]: W = data * scale (symmetric, per output channel);
* int4: `data` uint8 [..., N, Kp/2] with two values per byte along K (element 2j in the low nibble, 2j+1 in
  the high one), `scale` float32 [..., N, Kp/group] and `zero` uint8 [..., N, Kp/group] or None:
  W = (nibble - zero) * scale per group of `group` input features; zero None means symmetric (zero = 8).
  K is padded with zeros to Kp, a multiple of the group size; `in_features` keeps the true K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYMMETRIC_ZERO = 8


@dataclass
class Packed:
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int  # input features per scale (int4); 0 for int8 (one scale per output channel)
    in_features: int

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    @property
    def padded_in(self) -> int:
        return self.data.shape[-1] * (2 if self.bits == 4 else 1)

    def to(self, device) -> "Packed":
        zero = None if self.zero is None else self.zero.to(device)
        return Packed(self.data.to(device), self.scale.to(device), zero, self.bits, self.group, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store, by suffix ("" is the packed data)."""
        out = {"": self.data, "_scale": self.scale}
        if self.zero is not None:
            out["_zero"] = self.zero
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles 0..15 [..., K] (K even) -> bytes [..., K/2], element 2j in the low nibble."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> uint8 nibbles [..., K]."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


def dequantize(w: Packed) -> torch.Tensor:
    """The float32 weight [..., N, in_features] that w stands for."""
    if w.bits == 8:
        return w.data.float() * w.scale.float()[..., None]
    q = unpack_int4(w.data).float().unflatten(-1, (-1, w.group))  # [..., N, G, group]
    zero = SYMMETRIC_ZERO if w.zero is None else w.zero.float()[..., None]
    return ((q - zero) * w.scale.float()[..., None]).flatten(-2)[..., : w.in_features]
