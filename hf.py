"""Reading checkpoint files, off the method's reading path: one place that turns a missing,
truncated or corrupt file into one line naming it.

    read_json(path)             a JSON file (config.json, state.json, adapter_config.json ...)
    read_safetensors(path)      {name: tensor} of a .safetensors file (never a pickle)
    safetensors_metadata(path)  its string metadata (the word-feature cache's fingerprint)
    checkpoint_folder(folder)   where a checkpoint written by training.save_checkpoint is, if a
                                kill interrupted its save (FOLDER missing, FOLDER.old whole)
    is_ours(folder)             whether a training run of this repository wrote the folder
    CheckpointError             the error of a key that does not fit
    file_sha256(path)           what a LLaVA-SLT folder records of the encoder it was trained on

Every error is a ValueError or FileNotFoundError, which the scripts' `cli` prints as one line.
"""

import hashlib
import json
import os


class CheckpointError(KeyError):
    """A checkpoint whose keys do not fit the model (missing, unexpected): one line naming the
    file and the key. A KeyError, so `except KeyError` still sees it; the scripts' `cli` prints
    it as one line, while any other KeyError (a bug, e.g. batch["frame"]) shows its traceback."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# A run writes this file into every checkpoint folder it saves: {"stage", "files"}, the
# top-level names it wrote. A folder without it is the user's, and no run replaces it or
# deletes anything in it; in a folder with it, only the listed names are the run's.
RUN_MARKER = "llava_slt_run.json"


def read_json(path: str, what: str = "file"):
    """The parsed JSON of `path`; a missing or half-written file raises one line naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt: "
                         "write it again (re-run the stage that made it, or re-download it)") from None


def _corrupt(path: str, e: Exception) -> ValueError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ValueError(f"{path}: not a readable safetensors file ({reason}); it is truncated or corrupt: "
                      "write it again (re-run the stage that made it, or re-download it)")


def read_safetensors(path: str, keep=None) -> dict:
    """{name: tensor} (CPU) of the names `keep(name)` accepts (all by default)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or others
        raise _corrupt(path, e) from None


def safetensors_metadata(path: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise _corrupt(path, e) from None


def is_ours(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, RUN_MARKER))


def checkpoint_folder(folder: str) -> str:
    """`folder`, or `folder.old` when a kill between the two renames of a save left only that
    (see training.save_checkpoint): every reader finds the last whole checkpoint the same way,
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
