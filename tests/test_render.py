from __future__ import annotations

import pytest

from onnxcompress.parity import OutputComparison
from onnxcompress.render import auc_cell, size_change


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


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (0.00031, "0.6986→0.6980 (-0.0006 ± 0.0003)"),
        (0.00002, "0.6986→0.6980 (-0.0006 ± <0.0001)"),  # not "± 0.0000": the change is not exact
        (None, "0.6986→0.6980 (-0.0006)"),
    ],
)
def test_the_auc_change_comes_with_its_standard_error(error: float | None, said: str) -> None:
    output = OutputComparison(
        "score", "score", (10,), True, auc_reference=0.6986, auc_candidate=0.698, auc_delta_error=error
    )
    assert auc_cell(output) == said
