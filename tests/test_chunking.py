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


@pytest.mark.parametrize("n, cap_rows, block, expect", [
    (4200, 2048, 64, 1408),  # 3 chunks of <= 1408 rows, not 2048 + 2048 + 104
    (4096, 2048, 64, 2048),
    (70, 1, 32, 32),         # a budget under one block still gets one block
    (5, 4096, 32, 32),       # never more than n rounded up to a block
    (0, 100, 16, 16),
])
def test_triton_row_loss_chunks_balanced_in_blocks(monkeypatch, n, cap_rows, block, expect):
    pytest.importorskip("triton")
    from opd_kernels.triton.row_loss import chunk_rows as triton_chunk_rows

    vocab = 1000
    monkeypatch.setenv("OPD_WORKSPACE_MB", str(cap_rows * vocab * 4 / 2**20))
    rows = triton_chunk_rows(n, vocab, block)
    assert rows == expect and rows % block == 0
    cap = max(block, cap_rows // block * block)
    assert rows <= cap
    if n:
        sizes = [s.stop - s.start for s in row_chunks(n, rows)]
        assert len(sizes) == -(-n // cap)  # the fewest chunks the budget allows
        assert max(sizes) - min(sizes) < block * len(sizes)
