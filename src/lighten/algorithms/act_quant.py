"""Activation quantization, simulated: each chosen Linear fake-quantizes its input at every forward.

W8A8 / W4A8 quality is a property of the numbers a kernel would see, so the simulation needs no integer
kernel (lighten.runtime has the real W8A8 path). A format applied to an activation [..., tokens, features]
groups along the features, so `int8:channel` is dynamic per-token int8 and `int8:tensor` one scale per
call (dynamic per-tensor)."""

from torch import nn

from lighten import formats


def quantize_inputs(model: nn.Module, names: list[str], spec: str = "int8:channel") -> list:
    """Fake-quantize the input of each named module to `spec`; returns the hook handles (`.remove()` them
    to undo). Hooks run after those already registered, e.g. after an online Hadamard rotation."""
    fmt = formats.get(spec)

    def hook(module, args):
        return (fmt.fake_quantize(args[0]), *args[1:])

    return [model.get_submodule(name).register_forward_pre_hook(hook) for name in names]
