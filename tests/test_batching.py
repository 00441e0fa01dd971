import random

import pytest
import torch

from qembed.models.batching import bucket_down, bucket_up, pad_batch, token_budget_batches


def test_batches_cover_every_index_once_and_respect_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(300)]
    batches = token_budget_batches(lengths, 2048)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(300))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 2048 or len(batch) == 1
    # longest first, so padding inside a batch is small
    assert lengths[batches[0][0]] == max(lengths)


def test_text_longer_than_budget_gets_its_own_batch():
    assert token_budget_batches([10, 5000, 10], 100) == [[1], [0, 2]]


def test_bad_budget():
    with pytest.raises(ValueError):
        token_budget_batches([1], 0)


def test_left_padding_positions_start_at_first_real_token():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, left=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    right = pad_batch([[5, 6, 7], [8]], pad_id=0, left=False)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert "position_ids" not in right
    assert right["input_ids"].dtype == torch.long


def test_padding_stays_small_once_a_batch_is_big_enough():
    # the benchmark's shape: 27 texts spread evenly from 12 to 473 tokens all fit one 16k budget,
    # but one batch would pad them to twice their real size
    lengths = [round(12 + (473 - 12) * k / 26) for k in range(27)]
    for min_tokens, max_padding in ((1024, 0.2), (256, 0.05)):
        batches = token_budget_batches(lengths, 16384, min_batch_tokens=min_tokens, max_padding=max_padding)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        # beyond max_padding, waste only comes from short texts filling a batch up to min_tokens
        assert padded <= (1 + max_padding) * sum(lengths) + min_tokens
        for batch in batches[:-1]:  # every closed batch either filled up or its next text was much shorter
            assert sum(lengths[i] for i in batch) >= min_tokens


def test_bucket_ladder_has_four_sizes_per_octave_and_at_most_25_percent_padding():
    ladder = sorted({bucket_up(n) for n in range(1, 4097)})
    assert ladder[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16] and ladder[-1] == 4096
    assert len([size for size in ladder if 256 < size <= 512]) == 4
    for n in range(1, 4097):
        assert n <= bucket_up(n) < 1.25 * n or n <= 8
        assert bucket_down(n) <= n and bucket_down(n) in ladder and bucket_up(bucket_down(n)) == bucket_down(n)


def test_shape_buckets_give_few_shapes_within_the_budget():
    """A runtime that compiles per shape sees a bounded set: full batches are (ladder rows, ladder width) with
    no row padding, and padded tokens stay within the budget; plain batching makes a shape per batch."""
    rng = random.Random(1)
    shapes, plain_shapes, real, padded = set(), set(), 0, 0
    for _ in range(60):  # 60 chunks of a corpus, each batched on its own as the encode pipeline does
        lengths = [min(256, int(rng.lognormvariate(4.2, 0.5))) for _ in range(1024)]
        for batch in token_budget_batches(lengths, 4096, min_batch_tokens=4096, shape_buckets=True):
            rows, width = bucket_up(len(batch)), bucket_up(max(lengths[i] for i in batch))
            assert rows * width <= 4096 or len(batch) == 1
            shapes.add((rows, width))
            real += sum(lengths[i] for i in batch)
            padded += rows * width
        for batch in token_budget_batches(lengths, 4096, min_batch_tokens=4096):
            plain_shapes.add((len(batch), max(lengths[i] for i in batch)))
    assert len(shapes) <= 40 and len(plain_shapes) > 5 * len(shapes)
    assert padded < 1.25 * real
