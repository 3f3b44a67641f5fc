"""Shared pieces of the GPU suite: every test here needs a CUDA device and is skipped without one.

These tests have NOT been run yet (no GPU was available when they were written, 2026-11-21). Run them with
`python -m pytest -q tests/gpu` on a machine with a CUDA build of torch and `pip install -e '.[gpu,test]'`,
and record the outcome in docs/results/gpu.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from fusedserve.engine.model.default_model import ensure_default_model

    return ensure_default_model()
