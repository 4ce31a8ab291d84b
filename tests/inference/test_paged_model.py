"""GPT.forward_paged against GPT.forward: the logits of a mixed batch of prefills and decodes."""

import torch

from fastdl.inference import PagedAttentionMetadata

from .conftest import tiny_gpt


def test_forward_paged_matches_forward():
    model = tiny_gpt(seed=1)
    block_size, num_blocks = 8, 20
    spec = model.paged_kv_spec()
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_seq_len) == (2, 2, 16, 96)
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(spec.num_layers)]
    seqs = [torch.randint(0, 61, (n,)).tolist() for n in (13, 1, 20)]
    # Non-contiguous, out-of-order blocks per sequence.
    perm = torch.randperm(num_blocks).tolist()
    tables = [perm[0:2], perm[2:3], perm[5:8]]

    def run(chunks: list[tuple[int, int, int]]):
        """Feeds tokens [start, end) of sequence i for each (i, start, end), prefills first; returns the logits
        of each one's last token fed."""
        ids, pos, slots, qlens, lens, rows = [], [], [], [], [], []
        for i, start, end in chunks:
            seq, table = seqs[i], tables[i]
            ids += seq[start:end]
            pos += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            qlens.append(end - start)
            lens.append(end)
            rows.append(table + [0] * (3 - len(table)))
        meta = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor(rows, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32), query_lens=qlens,
            num_prefills=sum(q > 1 for q in qlens), logits_indices=torch.tensor(qlens).cumsum(0) - 1)
        with torch.no_grad():
            return model.forward_paged(torch.tensor(ids), torch.tensor(pos), caches, meta)

    def full(i, end):
        with torch.no_grad():
            return model(torch.tensor([seqs[i][:end]]))[0][0, -1]

    steps = [
        [(0, 0, 12), (2, 0, 9)],  # two prefills
        [(2, 9, 16), (0, 12, 13), (1, 0, 1)],  # a prefill after a cached prefix (chunked), two decodes
        [(2, 16, 20)],  # the rest of sequence 2, crossing a block boundary
    ]
    for chunks in steps:
        logits = run(chunks)
        for row, (i, _, end) in enumerate(chunks):
            torch.testing.assert_close(logits[row], full(i, end), atol=1e-4, rtol=1e-4)
