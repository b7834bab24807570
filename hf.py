"""Checkpoint-folder I/O, off the method's reading path: model.py and vision.py say *that*
weights come from a folder and call in here for *how*. Hugging Face folders (config.json and
safetensors weights, whole or sharded, read and written as transformers does), PEFT adapter
folders, and this repository's VCP and LLaVA-SLT folders. A missing, truncated or corrupt
file, or a key that does not fit, is one line naming the file (and the key): an
errors.UserError (MissingFileError, CheckpointError), which the scripts' `cli` prints as one line.

    read_json(path)                  a JSON file (config.json, state.json, adapter_config.json ...)
    read_safetensors(path, keep)     {name: tensor} of a .safetensors file (never a pickle)
    safetensors_metadata(path)       its string metadata (the word-feature cache's fingerprint)
    checkpoint_folder(folder)        where a checkpoint written by checkpoint.save_checkpoint is, if a
                                     kill interrupted its save (FOLDER missing, FOLDER.old whole)
    is_ours(folder)                  whether a training run of this repository wrote the folder
    file_sha256(path)                what a LLaVA-SLT folder records of the encoder it was trained on
    copy_strict(own, tensors, ...)   the strict copy every loader goes through (never warn-and-continue)
    load_weights(module, folder ...) the LLM's loader: a meta-device module filled one tensor at a time
    read_weights / load_strict       the other loaders: read a folder's tensors, copy them in strictly
    then, per kind of folder: the LLM's config.json spellings and sharded save, LoRA adapters,
    DINOv2 and mBART key names, VCP and LLaVA-SLT folders.
"""

import dataclasses
import hashlib
import json
import os

import torch
import torch.nn as nn

from errors import CheckpointError, MissingFileError, UserError


# A run writes this file into every checkpoint folder it saves: {"stage", "files"}, the
# top-level names it wrote. A folder without it is the user's, and no run replaces it or
# deletes anything in it; in a folder with it, only the listed names are the run's.
RUN_MARKER = "llava_slt_run.json"


def read_json(path: str, what: str = "file"):
    """The parsed JSON of `path`; a missing or half-written file raises one line naming it."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: not found ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt: "
                        "write it again (re-run the stage that made it, or re-download it)") from None


def _write_json(path: str, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def read_config(folder: str, what: str = "expected a Hugging Face model folder"):
    """(config.json of `folder`, its path); `what` ends the error when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"{folder}: no config.json; {what}")
    return read_json(path), path


def is_ours(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, RUN_MARKER))


def checkpoint_folder(folder: str) -> str:
    """`folder`, or `folder.old` when a kill between the two renames of a save left only that
    (see checkpoint.save_checkpoint): every reader finds the last whole checkpoint the same way,
    without renaming anything (a run may be saving into it now); training renames it back."""
    folder = os.path.normpath(folder)
    old = folder + ".old"
    if not os.path.exists(folder) and is_ours(old):
        return old
    return folder


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- safetensors
# The format: 8 bytes little-endian header length, a JSON header {name: {"dtype", "shape",
# "data_offsets"}} (+ "__metadata__"), then the tensors' bytes back to back. One reader for
# every file: each tensor is read into its own memory, so nothing stays backed by the file.

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "U8": torch.uint8, "BOOL": torch.bool}


def _corrupt(path: str, reason: str) -> ValueError:
    return UserError(f"{path}: not a readable safetensors file ({reason}); it is truncated or corrupt: "
                     "write it again (re-run the stage that made it, or re-download it)")


def _header(path: str):
    """({name: entry}, {metadata}, byte offset of the data) of a .safetensors file, checked
    against the file's size: a truncated file is named before anything is read."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise _corrupt(path, "the header is longer than the file")
        try:
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise _corrupt(path, "unreadable header") from None
    if end != size - 8 - n:
        raise _corrupt(path, f"the header indexes {end} bytes of tensors, the file holds {size - 8 - n}")
    return header, metadata, 8 + n


def _read_tensor(f, path: str, key: str, entry: dict, data_start: int, dtype=None, device="cpu"):
    """One tensor from an open safetensors file, read into fresh memory (of `dtype` on `device`)."""
    src = _DTYPES.get(entry["dtype"])
    if src is None:
        raise UserError(f"checkpoint {path}: {key} has dtype {entry['dtype']}, which this loader does not read")
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=src)  # CPU; the result itself when no cast or move is needed
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    if end - begin != len(buf):
        raise _corrupt(path, f"{key} holds {end - begin} bytes, its shape and dtype need {len(buf)}")
    f.seek(data_start + begin)
    while len(buf):  # one read may return less than asked (files over 2 GB, pipes)
        n = f.readinto(buf)
        if not n:
            raise _corrupt(path, f"the file ends inside {key}")
        buf = buf[n:]
    return out.to(device=device, dtype=dtype or src)


def read_safetensors(path: str, keep=None) -> dict:
    """{name: tensor} (CPU, as stored) of the names `keep(name)` accepts (all by default)."""
    entries, _, start = _header(path)
    with open(path, "rb", buffering=0) as f:
        return {k: _read_tensor(f, path, k, entries[k], start) for k in sorted(entries) if keep is None or keep(k)}


def safetensors_metadata(path: str) -> dict:
    return _header(path)[1]


def _save_safetensors(tensors: dict, path: str, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)


# ----------------------------------------------------------------------------- strict loading

def copy_strict(own: dict, tensors: dict, where: str, source: dict = None):
    """Copy checkpoint `tensors` into the model's `own` {name: tensor}, strictly: a missing,
    unexpected or mis-shaped key raises one line naming the file (source[name] when known,
    else `where`) and the key."""
    source = source or {}
    for k in sorted(own.keys() - tensors.keys()):
        raise CheckpointError(f"{where}: missing {k}")
    for k in sorted(tensors.keys() - own.keys()):
        raise CheckpointError(f"{source.get(k, where)}: unexpected {k} (made for another model?)")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise UserError(f"{source.get(k, where)}: {k} has shape {tuple(v.shape)}, "
                            f"the model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def weight_files(folder: str):
    """({key: safetensors path} of a folder's weights, the file a missing key is reported against):
    model.safetensors, or shards listed in model.safetensors.index.json. Pickled pytorch_model.bin
    files are never loaded (a pickle can run code)."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"checkpoint {index_path}: no weight_map")
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, name)):
                raise MissingFileError(f"checkpoint {index_path}: shard {name} is missing from {folder}")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}, index_path
    if os.path.isfile(single):
        return dict.fromkeys(_header(single)[0], single), single
    hint = (" (it has pytorch_model.bin, a pickle, which is not loaded: convert it once with "
            "transformers' save_pretrained(..., safe_serialization=True))"
            if os.path.isfile(os.path.join(folder, "pytorch_model.bin")) else "")
    raise MissingFileError(f"{folder}: no model.safetensors or model.safetensors.index.json; a model folder holds "
                           f"config.json and safetensors weights (pickled .bin files are not loaded){hint}")


def load_weights(module: nn.Module, folder: str, dtype, device, ignore=()):
    """Fill `module`, built on the meta device, with a folder's weights: each parameter is read
    from its file into its own memory (cast to `dtype`, placed on `device`) one at a time, so
    memory holds one copy of the weights plus at most one tensor. Keys in `ignore` are skipped."""
    dtype = torch_dtype(dtype)
    key_files, where = weight_files(folder)
    expected = dict(module.named_parameters())  # a tied weight is listed once
    for key, path in key_files.items():
        if key not in expected and key not in ignore:
            raise CheckpointError(f"checkpoint {path}: unexpected {key}")
    for key in expected:
        if key not in key_files:
            raise CheckpointError(f"checkpoint {where}: missing {key}")
    by_file = {}
    for key, path in key_files.items():
        if key in expected:
            by_file.setdefault(path, []).append(key)
    # Shapes first (headers only), so a wrong checkpoint fails before gigabytes are read.
    headers = {path: _header(path) for path in by_file}
    for path, keys in by_file.items():
        for key in keys:
            if key not in headers[path][0]:
                raise CheckpointError(f"checkpoint {path}: missing {key} (the index lists it in this shard)")
            shape = tuple(headers[path][0][key]["shape"])
            if shape != tuple(expected[key].shape):
                raise UserError(f"checkpoint {path}: {key} has shape {shape}, "
                                f"the config expects {tuple(expected[key].shape)}")
    modules = dict(module.named_modules())
    for path, keys in by_file.items():
        entries, _, start = headers[path]
        # Plain reads, not safetensors' mmap: a mapped tensor keeps the whole shard's pages
        # resident and stays backed by the file (which a later save into the folder overwrites).
        with open(path, "rb", buffering=0) as f:
            for key in keys:
                owner, name = key.rsplit(".", 1)
                modules[owner]._parameters[name] = nn.Parameter(
                    _read_tensor(f, path, key, entries[key], start, dtype, device))


def read_weights(folder: str, rename=None):
    """({our name: tensor}, {our name: the file it came from}, the file a missing key is reported
    against) of a folder's weights; rename(checkpoint key) -> our name, or None for a key that is
    not ours (left on disk: an mBART folder's decoder)."""
    rename = rename or (lambda k: k)
    key_files, where = weight_files(folder)
    tensors, source = {}, {}
    for path in sorted(set(key_files.values())):
        for k, v in read_safetensors(path, keep=lambda k: rename(k) is not None).items():
            tensors[rename(k)], source[rename(k)] = v, path
    return tensors, source, where


def load_strict(module: nn.Module, tensors: dict, source: dict, where: str, skip=lambda k: False):
    """copy_strict of everything in the module's state dict but `skip`."""
    own = {k: v for k, v in module.state_dict().items() if not skip(k)}
    copy_strict(own, tensors, f"checkpoint {where}", {k: f"checkpoint {v}" for k, v in source.items()})


# ----------------------------------------------------------------------------- LLM folders

def torch_dtype(d) -> torch.dtype:
    """A torch dtype, or its name ("bfloat16", "torch.float16" ...)."""
    if isinstance(d, torch.dtype):
        return d
    if not isinstance(getattr(torch, str(d).removeprefix("torch."), None), torch.dtype):
        raise UserError(f"unknown dtype {d!r} (float32, bfloat16, float16)")
    return getattr(torch, str(d).removeprefix("torch."))


def llm_config(cls, d: dict, source: str = "config.json"):
    """cls (model.LLMConfig) from a Hugging Face config.json dict."""
    fields = llm_config_fields(d, source)
    try:
        return cls(**fields)
    except ValueError as e:  # the config's own checks (__post_init__)
        raise UserError(f"{source}: {e}") from None


def llm_config_fields(d: dict, source: str = "config.json") -> dict:
    """LLMConfig's fields from a Hugging Face config.json dict: the one place that knows both
    spellings (rope_theta/rope_scaling or rope_parameters; torch_dtype or dtype)."""
    model_type = d.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise UserError(f"{source}: model_type {model_type!r} is not supported "
                        "(qwen2 for Qwen1.5/2/2.5, llama for Llama-3.x)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise UserError(f"{source}: missing {key}")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
        raise UserError(f"{source}: sliding-window attention is not supported; set use_sliding_window to false")
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):  # transformers >= 5 spelling
        scaling = dict(rope)
        theta = scaling.pop("rope_theta", d.get("rope_theta", 10000.0))
    else:
        scaling = dict(d.get("rope_scaling") or {})
        theta = d.get("rope_theta", 10000.0)
    if "type" in scaling:  # older spelling of rope_type
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    llama = model_type == "llama"
    heads = d["num_attention_heads"]
    return dict(
        model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"), max_position_embeddings=d.get("max_position_embeddings", 2048 if llama else 32768),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", False) if llama else True,
        o_proj_bias=d.get("attention_bias", False) if llama else False,
        mlp_bias=d.get("mlp_bias", False) if llama else False,
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch."))


def llm_config_json(c: dict) -> dict:
    """The config.json transformers reads, from LLMConfig's fields (the old rope/dtype spellings,
    which 4.x and 5.x both accept)."""
    llama = c["model_type"] == "llama"
    if llama and c["o_proj_bias"] != c["attention_bias"]:
        raise ValueError("a llama config has one attention_bias for q/k/v/o; o_proj_bias must equal it")
    if not llama and (not c["attention_bias"] or c["o_proj_bias"] or c["mlp_bias"]):
        raise ValueError("a qwen2 config has q/k/v biases and no o_proj/MLP bias")
    d = {
        "architectures": ["LlamaForCausalLM" if llama else "Qwen2ForCausalLM"],
        "model_type": c["model_type"], "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
        "head_dim": c["head_dim"], "hidden_act": "silu", "max_position_embeddings": c["max_position_embeddings"],
        "rms_norm_eps": c["rms_norm_eps"], "rope_theta": c["rope_theta"], "rope_scaling": c["rope_scaling"],
        "tie_word_embeddings": c["tie_word_embeddings"], "bos_token_id": c["bos_token_id"],
        "eos_token_id": c["eos_token_id"], "pad_token_id": c["pad_token_id"], "torch_dtype": c["dtype"],
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if llama:
        d.update(attention_bias=c["attention_bias"], mlp_bias=c["mlp_bias"])
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=c["num_hidden_layers"])
    return d


def read_generation_config(folder: str) -> dict:
    path = os.path.join(folder, "generation_config.json")
    return read_json(path) if os.path.isfile(path) else {}


def save_llm(folder: str, tensors: dict, config: dict, generation: dict, eos_ids: list, max_shard_size: int,
             dtype=None, tokenizer=None):
    """config.json, model.safetensors (or shards of at most max_shard_size bytes +
    model.safetensors.index.json) and generation_config.json, as transformers writes them;
    floating-point tensors cast to `dtype` if given; the tokenizer's files if given."""
    if dtype is not None:
        tensors = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
    config = dict(config, torch_dtype=str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch."))
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _save_safetensors(shard, os.path.join(folder, name), metadata={"format": "pt"})
    if len(shards) > 1:
        _write_json(os.path.join(folder, "model.safetensors.index.json"),
                    {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}})
    # Weights of an earlier save into the same folder would shadow or confuse the new ones.
    for old in os.listdir(folder):
        weights = old == "model.safetensors" or (old.startswith("model-") and "-of-" in old
                                                 and old.endswith(".safetensors"))
        if (weights and old not in names) or (old == "model.safetensors.index.json" and len(shards) == 1):
            os.remove(os.path.join(folder, old))
    _write_json(os.path.join(folder, "config.json"), config)
    gen = dict(generation)
    gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    gen.setdefault("bos_token_id", config["bos_token_id"])
    if config["pad_token_id"] is not None:
        gen.setdefault("pad_token_id", config["pad_token_id"])
    _write_json(os.path.join(folder, "generation_config.json"), gen)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- LoRA adapters (PEFT layout)

def write_lora(folder: str, layers: dict, tensors: dict):
    """adapter_model.safetensors (PEFT's base_model.model. prefix) + adapter_config.json, from the
    LoRA layers {name: model.LoRALinear} and their adapter matrices {name: tensor}."""
    if not layers:
        raise ValueError("save_lora: the module has no LoRA layers")
    first = next(iter(layers.values()))
    os.makedirs(folder, exist_ok=True)
    _save_safetensors({f"base_model.model.{n}": p for n, p in tensors.items()},
                      os.path.join(folder, "adapter_model.safetensors"))
    _write_json(os.path.join(folder, "adapter_config.json"),
                {"peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha,
                 "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "bias": "none",
                 "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0})


def read_lora(folder: str):
    """(adapter_config.json, {name: tensor} without PEFT's prefix, the weights' path)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    config_path = os.path.join(folder, "adapter_config.json")
    for p in (path, config_path):
        if not os.path.exists(p):
            raise MissingFileError(f"{p}: not found; an adapter folder holds adapter_model.safetensors "
                                   "and adapter_config.json")
    tensors = {k.removeprefix("base_model.model."): v for k, v in read_safetensors(path).items()}
    return read_json(config_path), tensors, path


# ----------------------------------------------------------------------------- DINOv2 and mBART folders

def _square(v, name: str) -> int:
    """DINOv2 configs give image/patch sizes as an int or a square pair."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise UserError(f"config {name}={v}: only square sizes are supported")
        return int(v[0])
    return int(v)


def vit_config_fields(d: dict) -> dict:
    """ViTConfig's fields from a DINOv2 config.json (with or without registers)."""
    model_type = d.get("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"config model_type {model_type!r}: expected dinov2 or dinov2_with_registers")
    registers = model_type == "dinov2_with_registers"
    return dict(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"], mlp_ratio=d.get("mlp_ratio", 4),
                patch_size=_square(d.get("patch_size", 14), "patch_size"),
                image_size=_square(d.get("image_size", 518), "image_size"),
                num_channels=d.get("num_channels", 3), layer_norm_eps=d.get("layer_norm_eps", 1e-6),
                layerscale_value=d.get("layerscale_value", 1.0), qkv_bias=d.get("qkv_bias", True),
                hidden_act=d.get("hidden_act", "gelu"), use_swiglu_ffn=d.get("use_swiglu_ffn", False),
                # the registers checkpoints always carry a mask token
                use_mask_token=True if registers else d.get("use_mask_token", True),
                num_register_tokens=d.get("num_register_tokens", 4) if registers else 0, model_type=model_type)


def load_dinov2(model: nn.Module, folder: str):
    """Keys may carry the `dinov2.` prefix (Dinov2ForImageClassification): the head is then ignored."""
    head = any(k.startswith("dinov2.") for k in weight_files(folder)[0])
    load_strict(model, *read_weights(folder, lambda k: k.removeprefix("dinov2.") if k.startswith("dinov2.")
                                     else None if head else k))


def text_encoder_config_fields(d: dict, pool=None) -> dict:
    """TextEncoderConfig's fields from an mBART config.json (ours adds `pool`)."""
    pool = pool or d.get("pool", "lang_code")
    if pool not in ("lang_code", "mean"):
        raise UserError(f"text encoder pool must be 'lang_code' or 'mean', got {pool!r}")
    return dict(vocab_size=d["vocab_size"], d_model=d["d_model"], encoder_layers=d["encoder_layers"],
                encoder_attention_heads=d["encoder_attention_heads"], encoder_ffn_dim=d["encoder_ffn_dim"],
                max_position_embeddings=d["max_position_embeddings"],
                activation_function=d.get("activation_function", "gelu"),
                scale_embedding=d.get("scale_embedding", False), pad_token_id=d.get("pad_token_id", 1), pool=pool)


def text_encoder_config_json(c: dict) -> dict:
    keys = ("vocab_size", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
            "max_position_embeddings", "activation_function", "scale_embedding", "pad_token_id", "pool")
    return {"model_type": "mbart", "architectures": ["MBartModel"], **{k: c[k] for k in keys}}


def read_tokenizer(folder: str):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer` without padding or truncation, or None."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()  # TextEncoder.tokenize pads and truncates itself
    tokenizer.no_truncation()
    return tokenizer


def _mbart_encoder_key(k: str):
    """An mBART checkpoint key -> the TextEncoder's, or None when it is not the encoder's."""
    k = k.removeprefix("model.")
    if k == "shared.weight":
        return "shared"
    return k.removeprefix("encoder.") if k.startswith("encoder.") else None


def load_mbart_encoder(model: nn.Module, folder: str):
    """The encoder of an mBART folder (MBartModel or MBartForConditionalGeneration); the decoder stays on disk."""
    tensors, source, where = read_weights(folder, _mbart_encoder_key)
    # encoder.embed_tokens is tied to shared; a checkpoint may hold either or both
    shared = tensors.pop("shared", None)
    if "embed_tokens.weight" not in tensors and shared is not None:
        tensors["embed_tokens.weight"], source["embed_tokens.weight"] = shared, source["shared"]
    load_strict(model, tensors, source, where)


def save_mbart_encoder(model: nn.Module, folder: str):
    """model (a vision.TextEncoder): config.json + model.safetensors (encoder.*, shared.weight) + tokenizer.json."""
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), text_encoder_config_json(dataclasses.asdict(model.config)))
    sd = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
    _save_safetensors(sd, os.path.join(folder, "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save(os.path.join(folder, "tokenizer.json"))


# ----------------------------------------------------------------------------- VCP and LLaVA-SLT folders

def dataclass_from_dict(cls, d: dict, where: str, **nested):
    """cls(**d) with the dataclasses `nested` {key: class} built from their sub-dicts first; an
    unknown key raises one line naming `where` and the key (vit.foo for a nested one)."""
    def build(klass, values, prefix):
        known = {f.name for f in dataclasses.fields(klass)}
        for k in values:
            if k not in known:
                raise UserError(f"{where}: unknown key {prefix}{k}; valid: {sorted(known)}")
        return klass(**values)
    d = dict(d, **{key: build(klass, d.get(key, {}), f"{key}.") for key, klass in nested.items()})
    return build(cls, d, "")


def save_vcp(model: nn.Module, folder: str):
    """model (a vision.VCPModel): model.safetensors (all but the frozen text encoder) + config.json
    (every sub-config; the text encoder's folder)."""
    os.makedirs(folder, exist_ok=True)
    _save_safetensors({k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")},
                      os.path.join(folder, "model.safetensors"))
    _write_json(os.path.join(folder, "config.json"),
                dict(dataclasses.asdict(model.config), lora_targets=list(model.config.lora_targets)))


def read_vcp_config(folder: str):
    """(the folder, or its last whole checkpoint; its config.json; that file's path)."""
    folder = checkpoint_folder(folder)  # a save cut by a kill: its last whole checkpoint
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: not found; a VCP folder holds config.json and model.safetensors")
    return folder, read_json(path), path


# A LLaVA-SLT folder: config.json (the LLM and visual-encoder folders it builds on, relative
# to itself so the tree can move, and the settings) + connector.safetensors, and after
# full-tuning llm_adapter/ (LoRA on the LLM) and visual/ (the tuned visual encoder).

def save_llava(model: nn.Module, folder: str, llm_folder: str, visual_folder: str, settings: dict,
               save_adapter, save_visual=None):
    """model: a model.LLaVASLT; save_adapter(folder) writes its LLM's LoRA adapter (when it has one),
    save_visual(folder) its tuned visual encoder (when given)."""
    os.makedirs(folder, exist_ok=True)
    _save_safetensors(model.connector.state_dict(), os.path.join(folder, "connector.safetensors"))
    if any(".lora_A." in n for n, _ in model.llm.named_parameters()):
        save_adapter(os.path.join(folder, "llm_adapter"))
    if save_visual is not None:
        save_visual(os.path.join(folder, "visual"))
    here = os.path.abspath(folder)
    _write_json(os.path.join(folder, "config.json"),
                {"format": "llava-slt", "llm": os.path.relpath(os.path.abspath(llm_folder), here),
                 "visual": os.path.relpath(os.path.abspath(visual_folder), here), "connector": model.connector.kind,
                 "visual_dim": model.connector_dims()[0], "visual_tokens": model.visual_tokens, **settings})


def read_llava_config(folder: str, check_visual: bool = True) -> dict:
    """config.json with the LLM and visual folders resolved, and "folder"; check_visual: refuse
    when the visual encoder the connector was trained on changed since (its recorded sha256)."""
    folder = checkpoint_folder(folder)  # a save cut by a kill: its last whole checkpoint
    config, path = read_config(folder, "not a LLaVA-SLT folder (train_vlt.py writes one)")
    if not isinstance(config, dict) or config.get("format") != "llava-slt":
        raise UserError(f"{path}: not a LLaVA-SLT folder (train_vlt.py writes one with \"format\": \"llava-slt\")")
    for key in ("llm", "visual"):
        config[key] = checkpoint_folder(os.path.join(folder, config[key]))
    if os.path.isdir(os.path.join(folder, "visual")):
        config["visual"] = os.path.join(folder, "visual")
    elif check_visual and config.get("visual_sha256"):
        weights = os.path.join(config["visual"], "model.safetensors")
        if os.path.isfile(weights) and file_sha256(weights) != config["visual_sha256"]:
            safetensors_metadata(weights)  # a damaged file is named as such, not as another encoder
            raise UserError(f"{weights}: the visual encoder changed since {folder} was trained on it "
                            "(another sha256); train the connector again on this encoder, or restore "
                            "the encoder it was trained on")
    config["folder"] = folder
    return config


def llava_adapter(folder: str):
    """The LLM's LoRA adapter folder of a LLaVA-SLT folder, or None when the LLM was not tuned."""
    path = os.path.join(folder, "llm_adapter")
    return path if os.path.isdir(path) else None


def load_connector(connector: nn.Module, folder: str):
    path = os.path.join(folder, "connector.safetensors")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: not found; the folder holds no trained connector")
    copy_strict(connector.state_dict(), read_safetensors(path), path)
