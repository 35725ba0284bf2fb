"""Rows per chunk (opd_kernels/_chunking.py): the workspace budget caps them, and the chunks are balanced."""
import pytest

from opd_kernels._chunking import chunk_rows, row_chunks


@pytest.mark.parametrize("n, cap, expect", [
    (4096, 524, 512),   # 8 chunks of 512, not 7 of 524 and one of 428
    (4200, 524, 467),   # 9 chunks of <= 467, not a last chunk of 8 rows
    (29, 7, 6),
    (29, 29, 29),
    (29, 100, 29),      # never more than n rows
    (5, 1, 1),
    (1, 1, 1),
    (0, 3, 1),          # N = 0 still gets a one-row workspace shape
])
def test_balanced_chunks(monkeypatch, n, cap, expect):
    vocab, bytes_per_entry = 1000, 4
    monkeypatch.setenv("OPD_WORKSPACE_MB", str(cap * vocab * bytes_per_entry / 2**20))
    rows = chunk_rows(n, vocab, bytes_per_entry, default_mb=1.0)
    assert rows == expect
    sizes = [s.stop - s.start for s in row_chunks(n, rows)]
    assert sum(sizes) == n and all(s <= cap for s in sizes)
    if n:
        # as many chunks as the cap forces; only the last is smaller, by fewer rows than there are chunks
        assert len(sizes) == -(-n // min(cap, n))
        assert max(sizes) - min(sizes) < len(sizes)
