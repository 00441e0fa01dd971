import random

import pytest
import torch

from qembed.models.batching import (
    bucket_up,
    full_rows,
    pad_batch,
    row_bucket_down,
    row_bucket_up,
    steady_rows,
    token_budget_batches,
)


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


def test_bucket_ladders_widths_four_sizes_per_octave_rows_powers_of_two():
    ladder = sorted({bucket_up(n) for n in range(1, 4097)})
    assert ladder[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16] and ladder[-1] == 4096
    assert len([size for size in ladder if 256 < size <= 512]) == 4
    for n in range(1, 4097):
        assert n <= bucket_up(n) < 1.25 * n or n <= 8
        assert row_bucket_down(n) <= n < 2 * row_bucket_down(n) and row_bucket_up(n) >= n > row_bucket_up(n) // 2
        assert row_bucket_up(n) & (row_bucket_up(n) - 1) == 0 and row_bucket_down(n) & (row_bucket_down(n) - 1) == 0


def test_shape_buckets_give_few_shapes_within_the_budget():
    """A runtime that compiles per shape sees a bounded set: batches are (power-of-two rows, ladder width), only
    a chunk's last batch pads rows, and padded tokens stay within the budget; plain batching makes a shape per
    batch. Both batching families: encoders fill batches, decoders close them where the width drops."""
    rng = random.Random(1)
    for min_tokens, budget, most_shapes in ((4096, 4096, 30), (256, 16384, 80)):
        shapes, plain_shapes, real, padded = set(), set(), 0, 0
        for _ in range(60):  # 60 chunks of a corpus, each batched on its own as the encode pipeline does
            lengths = [min(256, int(rng.lognormvariate(4.2, 0.5))) for _ in range(1024)]
            batches = token_budget_batches(lengths, budget, min_batch_tokens=min_tokens, shape_buckets=True)
            for number, batch in enumerate(batches):
                rows, width = row_bucket_up(len(batch)), bucket_up(max(lengths[i] for i in batch))
                assert rows * width <= budget or len(batch) == 1
                assert rows == len(batch) or number == len(batches) - 1  # row padding: the last batch only
                shapes.add((rows, width))
                real += sum(lengths[i] for i in batch)
                padded += rows * width
            for batch in token_budget_batches(lengths, budget, min_batch_tokens=min_tokens):
                plain_shapes.add((len(batch), max(lengths[i] for i in batch)))
        assert len(shapes) <= most_shapes and len(plain_shapes) > 5 * len(shapes), (len(shapes), len(plain_shapes))
        assert padded < 1.25 * real, (min_tokens, padded / real)


def test_steady_rows_leave_encoders_one_shape_per_width_and_cost_decoders_little():
    """Corpus encoding pads a chunk's last batch to `steady_rows`: encoder batches (which fill) then run in one
    row count per width, a full batch's; decoder batches (which close early) lose their smallest row counts
    at little padding."""
    rng = random.Random(2)
    chunks = [[min(256, int(rng.lognormvariate(4.2, 0.5))) for _ in range(1024)] for _ in range(60)]
    for min_tokens, budget in ((4096, 4096), (256, 16384)):
        runs = {}
        for steady in (False, True):
            shapes, real, padded = set(), 0, 0
            for lengths in chunks:
                for batch in token_budget_batches(lengths, budget, min_batch_tokens=min_tokens, shape_buckets=True):
                    longest = max(lengths[i] for i in batch)
                    rows, width = row_bucket_up(len(batch)), bucket_up(longest)
                    if steady:
                        rows = max(rows, steady_rows(longest, budget, min_tokens))
                    assert rows * width <= budget or len(batch) == 1
                    shapes.add((rows, width))
                    real += sum(lengths[i] for i in batch)
                    padded += rows * width
            runs[steady] = shapes, padded / real
        (shapes, padding), (steady_shapes, steady_padding) = runs[False], runs[True]
        assert len(steady_shapes) < len(shapes) and steady_padding < padding + 0.05, (min_tokens, runs)
        if min_tokens == budget:  # encoders: one shape per width, a full batch's rows
            assert sorted(steady_shapes) == sorted({(full_rows(w, budget), w) for _, w in steady_shapes})
    assert steady_rows(8, 16384, 256) == 32 and steady_rows(7, 16384, 256) == 64  # 256 tokens' worth of rows
    assert steady_rows(7, 4096, 4096) == 512 == full_rows(7, 4096)  # encoders: a full batch (at most 512 rows)
    assert steady_rows(5000, 4096, 4096) == 1  # a text longer than the budget runs alone
