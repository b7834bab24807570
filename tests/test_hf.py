"""Tests for hf.py's one safetensors reader: what safetensors itself reads, each tensor in its
own memory, and a damaged file named as such before anything is read."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf import read_safetensors, safetensors_metadata


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).bfloat16(),
            "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(6).view(2, 3),
            "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)}


def test_reads_what_safetensors_reads(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file(_tensors(), path, metadata={"fingerprint": "abc"})
    ours, theirs = read_safetensors(path), load_file(path)
    assert list(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
        assert ours[k].untyped_storage().nbytes() == v.numel() * v.element_size(), k  # its own memory
    assert list(read_safetensors(path, keep=lambda k: k.startswith("f"))) == ["f16", "f32"]
    assert safetensors_metadata(path) == {"fingerprint": "abc"}


def test_a_damaged_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    good = path.read_bytes()
    for bad in (good[:-40], b"\xff" * 8 + good[8:], good[:8] + b"[" + good[9:], good + b"\0", b"abc"):
        path.write_bytes(bad)
        for read in (read_safetensors, safetensors_metadata):
            with pytest.raises(ValueError) as err:
                read(str(path))
            line = str(err.value)
            assert line.startswith(f"{path}: not a readable safetensors file") and "truncated or corrupt" in line
            assert "\n" not in line
    with pytest.raises(FileNotFoundError, match="missing.safetensors: not found"):
        read_safetensors(str(tmp_path / "missing.safetensors"))
