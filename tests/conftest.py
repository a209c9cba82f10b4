"""Suite-wide settings."""

from __future__ import annotations

import pytest

from aesl_lightning import kernel_autograd


@pytest.fixture(autouse=True, scope="session")
def kernel_pieces_as_with_a_real_vocabulary():
    """The kernels hand chunks of at least MIN_PIECE_ELEMS elements to their CPU workers, so at the tests' tiny
    vocabularies they would always run in the caller's thread; a real vocabulary takes the workers' path (under
    Lightning's inference mode, autocast, ...). Let every test take it too."""
    default = kernel_autograd.MIN_PIECE_ELEMS
    kernel_autograd.MIN_PIECE_ELEMS = 64
    yield
    kernel_autograd.MIN_PIECE_ELEMS = default
