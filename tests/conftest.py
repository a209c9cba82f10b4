"""Suite-wide settings."""

from __future__ import annotations

import pytest

from aesl_lightning.ops import kernel_autograd


@pytest.fixture(autouse=True, scope="session")
def kernel_pieces_as_with_a_real_vocabulary():
    """The kernels hand chunks of at least MIN_PIECE_ELEMS elements to their CPU workers, so at the tests' tiny
    vocabularies they would always run in the caller's thread; a real vocabulary takes the workers' path (under
    Lightning's inference mode, autocast, ...). Let every test take it too."""
    default = kernel_autograd.MIN_PIECE_ELEMS
    kernel_autograd.MIN_PIECE_ELEMS = 64
    yield
    kernel_autograd.MIN_PIECE_ELEMS = default


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: tiny matmuls only add contention with a second thread on a busy
    2-core machine. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
