"""Fixtures of the host's tests."""

import pytest

from hvbackup.host import Host


@pytest.fixture
def host(tmp_path) -> Host:
    """A fresh virtualization host in a temporary directory."""
    return Host.init(str(tmp_path / "host"))
