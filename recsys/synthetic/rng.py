"""Counter-based random numbers: every draw is a hash of (seed, user, step, stream, slot).

Why not ``numpy.random.Generator`` per chunk: its stream depends on how users are grouped into chunks, so the
data would change with the chunk size or the number of worker processes. A splitmix64 hash of the draw's
coordinates is vectorised over users like any numpy op and gives every user the same numbers whichever chunk
or process simulates them.
"""

from __future__ import annotations

import sys

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TO_UNIT = 2.0**-32
_BIG_ENDIAN = sys.byteorder != "little"

#: Slots per (step, stream): a stream may draw at most this many numbers per user per step.
MAX_SLOTS = 1 << 12
#: Streams per step (static per-user draws use step -1).
N_STREAMS = 16


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (overflow wraps, as intended)."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def user_keys(seed: int, user_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per user: the root of all of that user's draws."""
    ids = np.asarray(user_ids, dtype=np.uint64)
    base = np.uint64(_mix(np.array([seed & _MASK], dtype=np.uint64))[0])
    with np.errstate(over="ignore"):
        x = ids * np.uint64(_GOLDEN) + base
    return _mix(_mix(x))


def uniform(keys: np.ndarray, step: int, stream: int, n_slots: int) -> np.ndarray:
    """Uniforms in (0, 1) with 32-bit resolution, shape [len(keys), n_slots], for (step, stream, slot).

    Each 64-bit hash yields two uniforms (its low and high halves): half the hashing per number.
    """
    if not 0 <= stream < N_STREAMS or not 0 < n_slots <= MAX_SLOTS:
        raise ValueError(f"stream must be in [0, {N_STREAMS}) and n_slots in [1, {MAX_SLOTS}]")
    half = (n_slots + 1) // 2
    counter = ((step + 1) * N_STREAMS + stream) * MAX_SLOTS
    offsets = np.arange(counter, counter + half, dtype=np.uint64) * np.uint64(_GOLDEN)
    x = keys.astype(np.uint64)[:, None] + offsets[None, :]
    _mix(x)
    halves = x.view(np.uint32)  # [n, 2 * half]: (low, high) of each hash on a little-endian machine
    if _BIG_ENDIAN:
        halves = halves.reshape(len(keys), half, 2)[:, :, ::-1].reshape(len(keys), 2 * half)
    out = halves[:, :n_slots].astype(np.float64)
    out += 0.5
    out *= _TO_UNIT
    return out


def uniform_at(keys: np.ndarray, step: int, stream: int, slots: np.ndarray) -> np.ndarray:
    """Element i is ``uniform(keys[i:i+1], step, stream, slots[i] + 1)[0, slots[i]]`` (those slots only)."""
    slots = np.asarray(slots, dtype=np.int64)
    if not 0 <= stream < N_STREAMS or (slots.size and (slots.min() < 0 or slots.max() >= MAX_SLOTS)):
        raise ValueError(f"stream must be in [0, {N_STREAMS}) and slots in [0, {MAX_SLOTS})")
    counter = ((step + 1) * N_STREAMS + stream) * MAX_SLOTS
    x = keys.astype(np.uint64) + (np.uint64(counter) + (slots // 2).astype(np.uint64)) * np.uint64(_GOLDEN)
    _mix(x)
    high = (slots % 2 == 1) != _BIG_ENDIAN  # which half of the hash the slot takes (see ``uniform``)
    half = np.where(high, x >> np.uint64(32), x & np.uint64(0xFFFFFFFF))
    out = half.astype(np.float64)
    out += 0.5
    out *= _TO_UNIT
    return out


def normal(keys: np.ndarray, step: int, stream: int, n_slots: int) -> np.ndarray:
    """Standard normals [len(keys), n_slots] by Box-Muller on two halves of one stream's slots."""
    half = (n_slots + 1) // 2
    u = uniform(keys, step, stream, 2 * half)
    r = np.sqrt(-2.0 * np.log(u[:, :half]))
    theta = 2.0 * np.pi * u[:, half:]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, :n_slots]


def gumbel(keys: np.ndarray, step: int, stream: int, n_slots: int) -> np.ndarray:
    return -np.log(-np.log(uniform(keys, step, stream, n_slots)))
