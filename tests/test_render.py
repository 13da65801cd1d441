from __future__ import annotations

import pytest

from onnxcompress.render import size_change


@pytest.mark.parametrize(
    ("before", "after", "said"),
    [
        (250_080, 58_840, "4.25x smaller"),
        (250_080, 250_726, "646 B larger"),  # pruned without sparse storage: it grew
        (250_080, 249_900, "180 B smaller"),  # not "1.00x smaller"
        (250_080, 250_080, "same size"),
        (100_000, 130_000, "1.30x larger"),
    ],
)
def test_the_summary_says_which_way_the_size_went(before: int, after: int, said: str) -> None:
    assert size_change(before, after) == said
