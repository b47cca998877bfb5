"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import accel  # noqa: E402

TINY_ARCHS = accel.models.TINY_ARCHS


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2 in fp32, loaded once per session.

    Tests must leave it unpatched (use `accel.patched(...)` or unpatch in a finally)."""
    model, tok = accel.models.load("smollm2-135m")
    return model, tok


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    return accel.models.tiny(request.param)


@pytest.fixture
def one_thread():
    """Many tiny ops: on a shared 2-vCPU VM the OpenMP spin-wait makes 2 threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed42():
    torch.manual_seed(42)
    return 42
