"""Packed int8 / int4 weights: the storage format the quantized kernels read, and its plain dequantisation.

A weight W [..., N, K] (N output features, K input features; leading dimensions stack experts) is stored as
* int8: `data` int8 [..., N, K], `scale` float32 [..., N]: W = data * scale (symmetric, per output channel);
* int4: `data` uint8 [..., N, Kp/2] with two values per byte along K (element 2j in the low nibble, 2j+1 in
  the high one), `scale` float32 [..., N, Kp/group] and `zero` uint8 [..., N, Kp/group] or None:
  W = (nibble - zero) * scale per group of `group` input features; zero None means symmetric (zero = 8).
  K is padded with zeros to Kp, a multiple of the group size; `in_features` keeps the true K.
* int6 (lm_head on the CPU under int4: engine/quant.py HEAD_INT6): `data` uint8 [..., N, Kp * 3/4], per 64
  input features 48 bytes: the values' low 4 bits as int4 packs them (32 bytes), then their high 2 bits (16
  bytes; `pack_int6`), `scale` float32 [..., N, Kp/group], no zero: W = (value - 32) * scale per group
  (symmetric, values 0..63).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYMMETRIC_ZERO = 8
INT6_ZERO = 32


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
        n = self.data.shape[-1]
        return n * 2 if self.bits == 4 else n // 3 * 4 if self.bits == 6 else n

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


def pack_int6(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..63 [..., K] (K a multiple of 64) -> bytes [..., K * 3/4]: per 64 values their low 4 bits as
    pack_int4 packs them (32 bytes: byte j values 2j, 2j + 1), then 16 bytes of their high 2 bits, byte i holding
    value 2i's (bits 0-1), 2(i + 16)'s (2-3), 2i + 1's (4-5) and 2(i + 16) + 1's (6-7): the order the kernel
    (kernels/cpu_gemv.cpp `unpack64`) widens them in."""
    v = values.to(torch.uint8).unflatten(-1, (-1, 64))
    low, high = v & 0xF, v >> 4
    even, odd = high[..., 0::2], high[..., 1::2]
    h = even[..., :16] | (even[..., 16:] << 2) | (odd[..., :16] << 4) | (odd[..., 16:] << 6)
    return torch.cat((pack_int4(low), h), dim=-1).flatten(-2)


def unpack_int6(data: torch.Tensor) -> torch.Tensor:
    """bytes [..., K * 3/4] -> uint8 values [..., K] (pack_int6 undone)."""
    d = data.unflatten(-1, (-1, 48))
    low, h = unpack_int4(d[..., :32]), d[..., 32:]
    even = torch.cat((h & 3, (h >> 2) & 3), dim=-1)
    odd = torch.cat(((h >> 4) & 3, h >> 6), dim=-1)
    high = torch.stack((even, odd), dim=-1).flatten(-2)
    return (low | (high << 4)).flatten(-2)


def dequantize(w: Packed) -> torch.Tensor:
    """The float32 weight [..., N, in_features] that w stands for."""
    if w.bits == 8:
        return w.data.float() * w.scale.float()[..., None]
    if w.bits == 6:
        q = unpack_int6(w.data).float().unflatten(-1, (-1, w.group))
        return ((q - INT6_ZERO) * w.scale.float()[..., None]).flatten(-2)[..., : w.in_features]
    q = unpack_int4(w.data).float().unflatten(-1, (-1, w.group))  # [..., N, G, group]
    zero = SYMMETRIC_ZERO if w.zero is None else w.zero.float()[..., None]
    return ((q - zero) * w.scale.float()[..., None]).flatten(-2)[..., : w.in_features]
