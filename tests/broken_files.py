"""Ways a weights file gets broken on disk: every reader must refuse each with one clear error."""

from pathlib import Path

CORRUPTIONS = {
    "garbage": lambda data: b"this is not a safetensors header" * 4,
    "cut in half": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
}


def corrupt(file: Path, how: str) -> Path:
    file.write_bytes(CORRUPTIONS[how](file.read_bytes()))
    return file
