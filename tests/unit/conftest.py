from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakehost import FakeHost


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path).build()


@pytest.fixture
def numa_host(tmp_path: Path) -> FakeHost:
    """2 nodes x 4 cores x 2 threads, 2M and 1G pools on both."""
    return FakeHost(tmp_path, nodes=2, cores_per_node=4, threads_per_core=2).build()
