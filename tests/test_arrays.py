import numpy as np

from qembed.arrays import GrowingArray


def test_growing_array_keeps_rows_in_order_across_regrowth():
    rng = np.random.default_rng(0)
    offsets = GrowingArray(capacity=3)
    rows = GrowingArray((4,), np.float32, capacity=2)
    expected_offsets, expected_rows = [], []
    for step in range(50):
        offsets.append(step * 7)
        expected_offsets.append(step * 7)
        block = rng.standard_normal((step % 5, 4)).astype(np.float32)
        rows.extend(block)
        expected_rows.extend(block)
    assert offsets.array.tolist() == expected_offsets and len(offsets) == 50 and offsets[-1] == 343
    assert rows.array.shape == (len(expected_rows), 4) and np.array_equal(rows.array, np.array(expected_rows))
    assert len(rows.data) < 2 * len(rows) + 5  # grown by doubling, not one row at a time or far beyond


def test_wrapped_array_grows_by_copying_and_leaves_the_original():
    original = np.arange(4, dtype=np.int64)
    grown = GrowingArray.wrap(original)
    grown.extend([10, 11])
    assert grown.array.tolist() == [0, 1, 2, 3, 10, 11] and original.tolist() == [0, 1, 2, 3]
