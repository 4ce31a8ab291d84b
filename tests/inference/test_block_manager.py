import pytest

from fastdl.inference import BlockManager, NoFreeBlocksError


def test_allocate_grow_and_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    table: list[int] = []
    bm.grow(table, 9)  # 9 tokens: 3 blocks
    assert len(table) == 3 and bm.num_free_blocks == 3 and len(set(table)) == 3
    bm.grow(table, 12)  # still 3 blocks
    assert len(table) == 3
    bm.grow(table, 13)
    assert len(table) == 4 and bm.num_free_blocks == 2
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 6
    bm.check_no_leaks()


def test_grow_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a: list[int] = []
    bm.grow(a, 8)
    b: list[int] = []
    with pytest.raises(NoFreeBlocksError):
        bm.grow(b, 9)  # needs 3, one free
    assert b == [] and bm.num_free_blocks == 1
    bm.free(a)
    bm.check_no_leaks()


def test_fork_shares_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 6)  # blocks [p0 full, p1 holding 2 tokens]
    child = bm.fork(parent)
    assert child == parent and all(bm.ref_counts[b] == 2 for b in parent)
    assert bm.num_free_blocks == 6
    # The child writes token 6, into the shared block p1: it gets a private copy.
    bm.grow(child, 7)
    copies = bm.prepare_write(child, 6, 7)
    assert copies == [(parent[1], child[1])] and child[0] == parent[0] and child[1] != parent[1]
    assert bm.ref_counts[parent[1]] == 1 and bm.ref_counts[child[1]] == 1 and bm.ref_counts[parent[0]] == 2
    # The parent now writes into p1, which only it holds: no copy.
    bm.grow(parent, 7)
    assert bm.prepare_write(parent, 6, 7) == []
    bm.free(child)
    assert bm.ref_counts[parent[0]] == 1
    bm.free(parent)
    bm.check_no_leaks()


def test_copy_on_write_without_free_blocks_raises_and_keeps_table():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 2)
    child = bm.fork(parent)
    bm.grow(parent, 8)  # takes the last free block
    with pytest.raises(NoFreeBlocksError):
        bm.prepare_write(child, 2, 3)
    assert child == parent[:1] and bm.ref_counts[parent[0]] == 2
    bm.free(parent)
    bm.free(child)
    bm.check_no_leaks()


def test_prefix_sharing():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = bm.share_prefix(prompt, len(prompt) - 1)
    assert a == []  # nothing cached yet
    bm.grow(a, len(prompt))
    bm.register_prefix(a, prompt, len(prompt))
    # Same first 8 tokens: shares both full blocks; a different second block: shares one.
    b = bm.share_prefix(prompt[:8] + [99, 98], 9)
    assert b == a[:2] and bm.ref_counts[a[0]] == 2
    c = bm.share_prefix(prompt[:4] + [7, 7, 7, 7, 7], 8)
    assert c == a[:1] and bm.ref_counts[a[0]] == 3
    # max_tokens keeps at least the last token to compute: a prompt of exactly 8 shares one block.
    d = bm.share_prefix(prompt[:8], 7)
    assert d == a[:1]
    # A different first block shares nothing even if the second block's tokens match.
    assert bm.share_prefix([50, 51, 52, 53] + prompt[4:8] + [1], 8) == []
    for table in (a, b, c, d):
        bm.free(table)
    bm.check_no_leaks()
    # Freed blocks leave the prefix table.
    assert bm.share_prefix(prompt, 9) == []


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a: list[int] = []
    bm.grow(a, 4)
    bm.register_prefix(a, [1, 2, 3, 4], 4)
    assert bm.share_prefix([1, 2, 3, 4, 5], 4) == []
    bm.free(a)
    bm.check_no_leaks()


def test_leak_check_and_double_free():
    bm = BlockManager(num_blocks=3, block_size=2)
    a: list[int] = []
    bm.grow(a, 3)
    with pytest.raises(AssertionError, match="leaked"):
        bm.check_no_leaks()
    saved = list(a)
    bm.free(a)
    with pytest.raises(AssertionError, match="freed more times"):
        bm.free(saved)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
