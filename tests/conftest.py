"""Shared test setup: tiny scale, two threads, seeded, and small datasets built once per run."""
from __future__ import annotations

import os

os.environ.setdefault("MUSICGEN_LITE_SCALE", "tiny")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """12 synthetic clips of 3 s at 16 kHz, with melody stems (about 5 s to render)."""
    from musicgen_lite.data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), n=12, seconds=3.0, seed=7, sample_rate=16_000,
                        workers=2, progress=False)


def _test_threads() -> int:
    import os

    return int(os.environ.get("MUSICGEN_LITE_TEST_THREADS", "1"))


def pytest_configure(config):
    """One torch thread per test process unless MUSICGEN_LITE_TEST_THREADS says otherwise: the
    tests are small (threads cost more than they give) and a long training job may share the
    machine's two cores (an oversubscribed OpenMP pool slowed it 8x)."""
    import torch

    torch.set_num_threads(_test_threads())


@pytest.fixture(autouse=True)
def _torch_threads():
    """Back to the test thread count before every test (CLI calls set their own --threads)."""
    import torch

    torch.set_num_threads(_test_threads())
    yield
