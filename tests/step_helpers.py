"""Stopping a training run at a step, and seeing which steps a resumed one runs: both through the
`batch_at` that a training module calls once per step."""

import pytest


def stop_at(monkeypatch, module, step: int) -> None:
    """Make module's training raise KeyboardInterrupt (what Ctrl-C or a kill leaves) when it asks for
    the batch of `step`."""
    real = module.batch_at

    def stopping(stream, at, *args):
        if at == step:
            raise KeyboardInterrupt
        return real(stream, at, *args)

    monkeypatch.setattr(module, "batch_at", stopping)


def record_steps(monkeypatch: pytest.MonkeyPatch, module) -> list[int]:
    """Undo stop_at and return the list that the steps module's training runs are appended to."""
    monkeypatch.undo()
    real, seen = module.batch_at, []

    def recording(stream, at, *args):
        seen.append(at)
        return real(stream, at, *args)

    monkeypatch.setattr(module, "batch_at", recording)
    return seen
