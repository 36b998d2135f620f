"""Lossless packed storage of float32 weights that came from a 4- or 8-bit GGUF file.

A model read from a quantized GGUF file (the embedded default is SmolLM2-135M-Instruct from a
``Q4_1`` file, its embedding ``Q8_0``) holds float32 weights whose every block of 32 values
along an input row is exactly ``d * q + m`` with ``q`` in 0..15 (Q4_1) or ``d * q`` with ``q``
in -128..127 (Q8_0), ``d`` and ``m`` float16 numbers.  The few-row kernel can read such a
weight as its ``q`` and per-block ``(d, m)``, 0.75 or 1.125 bytes a weight instead of 4, and
expand it in registers to the very same float32 values (``csrc/products.h``: ``Q4Rows``,
``Q8Rows``), so its products are bitwise those of the float32 weights, at every width: a
decoding pass is bound by streaming the weights, and the default's one-token pass streams
~100 MB instead of ~540 MB.

``pack_weight`` finds the block parameters from the float32 values and keeps a packing only
when every block it covers reproduces its 32 values exactly; anything else (a model trained in
float32, a bfloat16 checkpoint) is simply not packed.
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["BLOCK", "PackedWeight", "pack_weight", "unpack_weight"]

BLOCK = 32
"""Values per block along a weight's input dimension (GGUF's Q4_1 and Q8_0)."""

_PROBE_ROWS = 8  # rows tried first, so that a weight that does not pack is left in ~1 ms
_STEPS = (0, -1, 1, -2, 2, -3, 3)  # float16 neighbours of the first guess of d, in order


@attrs.frozen(eq=False)
class PackedWeight:
    """A weight's leading ``rows`` rows in packed form.

    Attributes:
      kind: ``"q4_1"`` (``q`` uint8 ``(rows, in / 2)``: byte ``j`` of a block holds value ``j``
        in its low nibble and value ``j + 16`` in its high one; ``scales`` float32
        ``(rows, in / 32, 2)``: ``(d, m)``) or ``"q8_0"`` (``q`` int8 ``(rows, in)``;
        ``scales`` float32 ``(rows, in / 32)``: ``d``).
      q: the quantized values.
      scales: the per-block parameters, float16 numbers stored as float32.
      rows: how many leading rows of the weight are packed (the rest stay float32: a row
        appended after the quantization, such as a new token's output row, packs no further).
    """

    kind: str
    q: torch.Tensor
    scales: torch.Tensor
    rows: int

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams for the packed rows."""
        return int(self.q.numel() * self.q.element_size() + self.scales.numel() * 4)


def _half_steps(value: torch.Tensor, step: int) -> torch.Tensor:
    """float16 numbers ``step`` representable values away from ``value`` (float32 out)."""
    bits = value.to(torch.float16).view(torch.int16).to(torch.int32) + step
    return bits.clamp(-32768, 32767).to(torch.int16).view(torch.float16).to(torch.float32)


def _solve(
    blocks: torch.Tensor, offset: torch.Tensor | None, span: torch.Tensor, levels: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block, a float16 ``d`` and integer ``q`` in ``levels`` with ``d * q (+ offset)`` equal
    to the block's values; returns ``(d, q, ok)``."""
    low, high = levels
    base = blocks if offset is None else blocks - offset
    d = torch.zeros(blocks.shape[0], dtype=torch.float32)
    q = torch.zeros(blocks.shape, dtype=torch.float32)
    ok = torch.zeros(blocks.shape[0], dtype=torch.bool)
    for step in _STEPS:
        todo = ~ok
        if not bool(todo.any()):
            break
        guess = _half_steps(span[todo], step)
        safe = torch.where(guess == 0, torch.ones_like(guess), guess)
        levels_q = torch.round(base[todo] / safe[:, None]).clamp(low, high)
        levels_q = torch.where(guess[:, None] == 0, torch.zeros_like(levels_q), levels_q)
        rebuilt = guess[:, None] * levels_q
        if offset is not None:
            rebuilt = rebuilt + offset[todo]
        good = (rebuilt == blocks[todo]).all(dim=1) & torch.isfinite(guess)
        index = todo.nonzero().squeeze(1)[good]
        d[index], q[index], ok[index] = guess[good], levels_q[good], True
    return d, q, ok


def _pack_rows(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack every row it can; returns ``(q, scales, row_ok)``."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(-1, BLOCK)
    if kind == "q4_1":
        low = blocks.amin(dim=1)
        offset_ok = low.to(torch.float16).to(torch.float32) == low
        d, q, ok = _solve(blocks, low[:, None], (blocks.amax(dim=1) - low) / 15, (0, 15))
        ok &= offset_ok
        levels = q.to(torch.uint8).reshape(-1, 2, BLOCK // 2)
        packed = (levels[:, 0] | (levels[:, 1] << 4)).reshape(out_features, in_features // 2)
        scales = torch.stack([d, low], dim=1).reshape(out_features, in_features // BLOCK, 2)
    else:
        d, q, ok = _solve(blocks, None, blocks.abs().amax(dim=1) / 127, (-128, 127))
        packed = q.to(torch.int8).reshape(out_features, in_features)
        scales = d.reshape(out_features, in_features // BLOCK)
    row_ok = ok.reshape(out_features, in_features // BLOCK).all(dim=1)
    return packed.contiguous(), scales.contiguous(), row_ok


def pack_weight(weight: torch.Tensor) -> PackedWeight | None:
    """The packed form of a float32 ``(out, in)`` weight, or ``None`` where it has none.

    Tries Q4_1 and then Q8_0; keeps the longest run of leading rows whose every block
    reproduces its float32 values exactly (``unpack_weight`` of the result equals those rows
    bitwise), and ``None`` when that run is empty, the weight is not float32 on the CPU, or
    ``in`` is not a multiple of 32.
    """
    if (
        weight.dtype != torch.float32
        or weight.device.type != "cpu"
        or weight.dim() != 2
        or weight.shape[1] % BLOCK
        or weight.numel() == 0
    ):
        return None
    values = weight.detach().contiguous()
    for kind in ("q4_1", "q8_0"):
        _, _, probe = _pack_rows(values[:_PROBE_ROWS], kind)
        if not bool(probe[0]):
            continue
        q, scales, row_ok = _pack_rows(values, kind)
        rows = int(values.shape[0]) if bool(row_ok.all()) else int((~row_ok).nonzero()[0, 0])
        packed = PackedWeight(kind, q[:rows].contiguous(), scales[:rows].contiguous(), rows)
        if not torch.equal(unpack_weight(packed), values[:rows]):  # the promise, checked
            return None
        return packed
    return None


def unpack_weight(packed: PackedWeight) -> torch.Tensor:
    """The float32 values of the packed rows (what the kernel computes in registers)."""
    if packed.kind == "q4_1":
        q = packed.q.reshape(packed.rows, -1, BLOCK // 2)
        levels = torch.cat([q & 15, q >> 4], dim=2).to(torch.float32)
        d, m = packed.scales[..., 0:1], packed.scales[..., 1:2]
        return (d * levels + m).reshape(packed.rows, -1)
    q = packed.q.reshape(packed.rows, -1, BLOCK).to(torch.float32)
    return (packed.scales[..., None] * q).reshape(packed.rows, -1)
