"""Fixtures for the wire-layer tests: identities and the codec lookup the tests pass explicitly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lioncub.optim.codec import Codec
from lioncub.optim.codecs import get_codec
from lioncub.protocol import Identity


@pytest.fixture(scope="session")
def codec_lookup() -> Callable[[str], Codec]:
    return get_codec


@pytest.fixture(scope="session")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def bob() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def mallory() -> Identity:
    return Identity.generate()
