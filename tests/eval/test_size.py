import pytest
import torch
from safetensors.torch import save_file

from lighten.errors import ModelError
from lighten.eval.size import disk_bytes, size_report, tensor_sizes


def test_disk_bytes_counts_every_file_recursively(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_bytes(b"{}" * 7)
    assert disk_bytes(tmp_path) == 1014


def test_disk_bytes_needs_a_directory(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        disk_bytes(tmp_path / "nope")


def test_tensor_sizes_read_from_headers(tmp_path):
    save_file(
        {
            "a": torch.zeros(3, 5),
            "b": torch.zeros(7, dtype=torch.uint8),
            "c": torch.zeros(2, dtype=torch.float16),
        },
        tmp_path / "model.safetensors",
    )
    assert tensor_sizes(tmp_path) == {"a": (15, 60), "b": (7, 7), "c": (2, 4)}
    row = size_report(tmp_path)
    assert row["weight_bytes"] == 71 and row["format"] == "original"
    assert row["bits_per_weight"] == pytest.approx(8 * 71 / 24)
