"""A byte-level tokenizer with a padded vocabulary, built locally (no downloads).

Ids 0..255 are the bytes, then three special tokens, then ``<unused_k>`` entries up to
``vocab_size`` (1024 by default). The unused entries are never produced by the tasks: they are
there so that the lm_head has a realistic width and the full-vocabulary divergence really sums
over 1024 entries (the models learn to give them ~0 probability, as real models do for rare ids).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

N_BYTES = 256


class ByteTokenizer:
    """Bytes + ``<pad>``, ``<bos>``, ``<eos>`` + unused padding entries.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("12+34="))
    '12+34='
    """

    def __init__(self, vocab_size: int = 1024):
        if vocab_size < N_BYTES + 3:
            raise ValueError(f"vocab_size must be >= {N_BYTES + 3}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pad_id = N_BYTES
        self.bos_id = N_BYTES + 1
        self.eos_id = N_BYTES + 2
        self.n_unused = vocab_size - (N_BYTES + 3)

    def token(self, i: int) -> str:
        """The string form of one id (bytes as latin-1 characters)."""
        if i < N_BYTES:
            return bytes([i]).decode("latin-1")
        specials = {self.pad_id: "<pad>", self.bos_id: "<bos>", self.eos_id: "<eos>"}
        return specials.get(i, f"<unused_{i - N_BYTES - 3}>")

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes only; special and unused ids are dropped."""
        return bytes(i for i in ids if i < N_BYTES).decode("utf-8", errors="replace")

    def decode_completion(self, ids: Sequence[int]) -> str:
        """Decode up to (not including) the first ``<eos>``; a completion without one is kept whole
        but can never match an answer, since answers are always followed by ``<eos>``."""
        out = []
        for i in ids:
            if i == self.eos_id:
                return self.decode(out)
            out.append(int(i))
        return self.decode(out) + "\uFFFF"  # no <eos>: unmatchable marker

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """Encode equal-length texts into a (B, T) int64 tensor (the tasks have fixed lengths)."""
        rows = [([self.bos_id] if bos else []) + self.encode(t) + ([self.eos_id] if eos else []) for t in texts]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"texts must encode to one length, got lengths {sorted(lengths)}")
        return torch.tensor(rows, dtype=torch.long)
