"""torch_threads: the block runs on n threads, and the count comes back even on an error."""

from __future__ import annotations

import pytest
import torch

from ichscan.threads import torch_threads


def test_thread_count_is_set_and_put_back_even_after_an_error() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
