"""Label Studio brush RLE, vectorised.

Produces the same bytes as label_studio_sdk.converter.brush.mask2rle (tested byte for byte), in
milliseconds instead of seconds at 20 MP. The format (from thi.ng/rle-pack, as the SDK writes it):
a 32-bit value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1 (3, 4, 8, 16),
then per run either a literal (flag 0) or a repeat (flag 1), a 2-bit size index, the length - 1,
and an 8-bit value. Each pixel is repeated four times (RGBA).
"""

from __future__ import annotations

import numpy as np

_RLE_SIZES = (3, 4, 8, 16)
_WORD_SIZE = 8
_CHUNK = 1 << 16


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(values) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(values[1:] != values[:-1])
    ends = np.append(change, len(values) - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths.astype(np.int64), values[ends].astype(np.int64)


def _pack(codes: np.ndarray, widths: np.ndarray) -> list[int]:
    """Concatenate each code's `width` low bits (MSB first) into bytes, padded as the SDK pads.

    Every code is at most 32 bits, so shifted to its bit offset within its 32-bit word it lies in the
    64 bits of that word and the next. Codes never share a bit, so summing a word's contributions
    equals OR-ing them; offsets are sorted, so each word's contributions are one contiguous run
    (np.add.reduceat, exact in uint64). Two contributions a code instead of one a byte (five): a
    ragged 20 MP mask's 440,000 runs pack in half the time.
    """
    ends = np.cumsum(widths)
    total_bits = int(ends[-1])
    total_bits += 8 - total_bits % 8  # the SDK adds a whole zero byte when already aligned
    offsets = ends - widths
    word = offsets >> 5
    placed = codes.astype(np.uint64) << (64 - widths - (offsets & 31)).astype(np.uint64)
    out = np.zeros(total_bits // 32 + 2, dtype=np.uint64)
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    out[word[starts]] += np.add.reduceat(placed >> np.uint64(32), starts)
    out[word[starts] + 1] += np.add.reduceat(placed & np.uint64(0xFFFFFFFF), starts)
    return out.astype(">u4").view(np.uint8)[: total_bits // 8].tolist()


def _encode_runs(count: int, lengths: np.ndarray, vals: np.ndarray) -> list[int]:
    # runs longer than 2**16 become k full chunks of 2**16 plus a remainder, as the SDK writes them
    chunks = np.where(lengths > 256, (lengths - 1) // _CHUNK, 0)
    remainder = lengths - chunks * _CHUNK
    single = lengths == 1
    size_index = np.select([lengths <= 8, lengths <= 16, lengths <= 256], [0, 1, 2], default=3).astype(np.int64)
    field = np.array(_RLE_SIZES, dtype=np.int64)[size_index]
    flag = (~single).astype(np.int64)
    count_field = np.where(single, 0, remainder - 1)
    code = (flag << (2 + field + 8)) | (size_index << (field + 8)) | (count_field << 8) | vals
    width = 1 + 2 + field + 8

    if chunks.any():
        full_code = (1 << 26) | (3 << 24) | ((_CHUNK - 1) << 8)
        reps = chunks + 1
        order = np.repeat(np.arange(len(code)), reps)
        is_last = np.zeros(len(order), dtype=bool)
        is_last[np.cumsum(reps) - 1] = True
        code = np.where(is_last, code[order], full_code | vals[order])
        width = np.where(is_last, width[order], 27)

    header = [(count, 32), (_WORD_SIZE - 1, 5)] + [(s - 1, 4) for s in _RLE_SIZES]
    codes = np.concatenate([np.array([c for c, _ in header], dtype=np.int64), code])
    widths = np.concatenate([np.array([w for _, w in header], dtype=np.int64), width])
    return _pack(codes, widths)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Brush RLE for a 2-D boolean mask: foreground 255, four channels per pixel.

    Same bytes as mask2rle(mask * 255), but runs are found on pixels, not on the 4x RGBA copy.
    """
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    flat = np.ascontiguousarray(mask, dtype=bool).ravel().view(np.uint8)
    lengths, vals = _runs(flat)
    return _encode_runs(flat.size * 4, lengths * 4, vals * 255)


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE into a boolean (height, width) mask (alpha channel > 0)."""
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = 0
        for b in bits[pos : pos + n]:
            value = (value << 1) | int(b)
        pos += n
        return value

    count = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8)
    i = 0
    while i < count:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    if count != height * width * 4:
        raise ValueError(f"RLE holds {count} values, expected {height}x{width}x4")
    return out.reshape(height, width, 4)[:, :, 3] > 0
