"""Length-limited canonical Huffman codes over a byte alphabet, and a vectorized bit packer.

Used by `dfloat11` for the BF16 exponent bytes. Everything here works on whole arrays: the code
is built from a 256-entry histogram (package-merge, vectorized over the alphabet), and a
stream of millions of symbols is packed with a handful of tensor passes, never a Python loop
per symbol.

Bit order: a stream is a sequence of int32 words read most-significant bit first; bit p of the
stream is bit (31 - p % 32) of word p // 32. Codes are written most-significant bit first.
"""
from __future__ import annotations

import numpy as np
import torch

ALPHABET = 256


def limited_code_lengths(counts: torch.Tensor, max_length: int) -> torch.Tensor:
    """Optimal prefix-code lengths with no code longer than `max_length` (package-merge).

    counts: [256] int symbol frequencies (at least one non-zero). Returns [256] int64 lengths,
    0 for symbols that never occur. A single used symbol gets length 1.
    """
    counts = np.asarray(counts.cpu(), dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(ALPHABET, dtype=np.int64)
    if used.size == 1:
        lengths[used] = 1
        return torch.from_numpy(lengths)
    if used.size > 2**max_length:
        raise ValueError(f"{used.size} symbols do not fit codes of at most {max_length} bits")
    order = used[np.argsort(counts[used], kind="stable")]
    leaf_weights = counts[order]
    leaf_members = np.eye(used.size, dtype=np.int64)  # row i: which symbols an item contains
    weights, members = leaf_weights, leaf_members
    for _ in range(max_length - 1):
        pairs = weights.size // 2
        package_weights = weights[0:2 * pairs:2] + weights[1:2 * pairs:2]
        package_members = members[0:2 * pairs:2] + members[1:2 * pairs:2]
        # Merge leaves and packages by weight; a stable sort keeps leaves first on ties so the
        # code is deterministic.
        weights = np.concatenate([leaf_weights, package_weights])
        members = np.concatenate([leaf_members, package_members])
        merged = np.argsort(weights, kind="stable")
        weights, members = weights[merged], members[merged]
    chosen = members[: 2 * used.size - 2].sum(axis=0)
    lengths[order] = chosen
    return torch.from_numpy(lengths)


def canonical_codes(lengths: torch.Tensor) -> torch.Tensor:
    """[256] code lengths -> [256] int64 canonical codes (shorter codes first, then by symbol)."""
    lengths = lengths.tolist()
    codes = [0] * ALPHABET
    code, previous = 0, 0
    for symbol in sorted((s for s in range(ALPHABET) if lengths[s]), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - previous
        codes[symbol] = code
        code += 1
        previous = lengths[symbol]
    return torch.tensor(codes, dtype=torch.int64)


def decode_table(lengths: torch.Tensor, table_bits: int) -> torch.Tensor:
    """[2^table_bits] int16 lookup table of a canonical code: indexed by the next `table_bits`
    stream bits, entry = symbol | (code length << 8). Unused entries (impossible for a complete
    code) are 0."""
    codes = canonical_codes(lengths)
    table = torch.zeros(2**table_bits, dtype=torch.int16)
    for symbol in torch.nonzero(lengths).flatten().tolist():
        length = int(lengths[symbol])
        first = int(codes[symbol]) << (table_bits - length)
        table[first: first + (1 << (table_bits - length))] = symbol | (length << 8)
    return table


def pack_codes(aligned_codes: np.ndarray, starts: np.ndarray, n_words: int) -> np.ndarray:
    """Write codes into an int32 word stream (module docstring bit order).

    aligned_codes: [S] uint64, each code left-aligned (code << (64 - length)), lengths 1..32;
    starts: [S] uint64 bit position of each code, increasing, codes not overlapping and no
    gaps between them. Returns [n_words] int32.
    """
    # The 64-bit window that starts at the code's word; a code spans at most two words.
    window = aligned_codes >> (starts & np.uint64(31))
    # Codes of one word are consecutive, and with codes of at most 32 bits every word holds the
    # start of one. Their bit fields are disjoint, so an OR over each run of equal `word` gives
    # that word in the high half and its spill into the next word in the low half.
    word = starts >> np.uint64(5)
    first_of_word = np.empty(word.size, dtype=bool)
    first_of_word[0] = True
    np.not_equal(word[1:], word[:-1], out=first_of_word[1:])
    runs = np.flatnonzero(first_of_word)
    merged = np.bitwise_or.reduceat(window, runs)
    stream = np.zeros(n_words + 1, dtype=np.uint64)
    stream[: merged.size] = merged >> np.uint64(32)
    stream[1: merged.size + 1] |= merged & np.uint64(0xFFFFFFFF)
    return stream[:n_words].astype(np.uint32).view(np.int32)
