"""Spec strings parsed into their four fields, without torch: recipes check their specs with this before
a model (or torch) is loaded. The grammar is documented in lighten.formats; lighten.formats.format builds
each format's numerics on the Spec parsed here.
"""

import re
from dataclasses import dataclass

from lighten.errors import SpecError

INTS = tuple(f"int{b}" for b in range(2, 9))
MX = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")  # OCP Microscaling v1.0
# GGUF's block types: fixed blocks, no options. Their numerics: lighten.formats.ggml.TYPES.
GGML = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
GGML += ("tq1_0", "tq2_0")
# The GGUF types whose llama.cpp quantizer takes an importance matrix (q8_0 and tq* ignore it).
IMPORTANCE_WEIGHTED = tuple(t for t in GGML if t not in ("q8_0", "tq1_0", "tq2_0"))

# NAME -> default granularity. int8 and fp8 have enough levels for one scale per output
# channel; narrower ints get the usual g128. fp6/fp4 get g32, the MX block size, so that e.g.
# fp4_e2m1 vs mxfp4 isolates the scale format (fp16 absmax vs power of two).
DEFAULTS = {
    **{name: "channel" if name == "int8" else "g128" for name in INTS},
    "fp8_e4m3": "channel",
    "fp8_e5m2": "channel",
    "fp6_e3m2": "g32",
    "fp6_e2m3": "g32",
    "fp4_e2m1": "g32",
    **dict.fromkeys(MX, "g32"),  # fixed by the MX spec
    "nf4": "g64",  # QLoRA's block size
    "ternary": "tensor",  # BitNet b1.58: one absmean per weight matrix
    "binary": "channel",
}
ALIASES = {"mxfp8": "mxfp8_e4m3"}
GRAMMAR = "NAME[:tensor|:channel|:gN][:sym|:asym][:dq]"


@dataclass(frozen=True)
class Spec:
    family: str  # NAME in the grammar, e.g. "int4", "mxfp4", "nf4"
    granularity: str  # "tensor" | "channel" | "g<N>" | "block" (GGUF types: the type fixes its blocks)
    asym: bool = False
    dq: bool = False

    @property
    def name(self) -> str:
        """Canonical spec: parse_spec(spec.name) == spec."""
        if self.family in GGML:
            return self.family
        sym = (":asym" if self.asym else ":sym") if self.family in INTS else ""
        return f"{self.family}:{self.granularity}{sym}{':dq' if self.dq else ''}"


def parse_spec(spec: str) -> Spec:
    """Parse a spec string (grammar in lighten.formats); SpecError if invalid."""
    if not isinstance(spec, str):
        raise SpecError(f"a format spec is a string like 'int4:g128', got {spec!r}")
    name, *options = spec.strip().lower().split(":")
    name = ALIASES.get(name, name)
    if name in GGML:
        if options:
            raise SpecError(f"{name} is a GGUF block type with fixed blocks: write {name!r}, not {spec!r}")
        return Spec(name, "block")
    if name not in DEFAULTS:
        raise SpecError(
            f"unknown format {name!r} in spec {spec!r}. Valid names: {', '.join(DEFAULTS)}, and the GGUF "
            f"types {', '.join(GGML)} (alias: mxfp8 = mxfp8_e4m3). Grammar: {GRAMMAR}"
        )
    granularity = sym = dq = None
    for opt in options:
        if opt in ("tensor", "channel") or opt.startswith("g"):
            if opt.startswith("g") and not re.fullmatch(r"g[1-9][0-9]*", opt):
                raise SpecError(f"group size in {spec!r} must be a positive integer, e.g. g128")
            granularity = _once(granularity, opt, spec)
        elif opt in ("sym", "asym"):
            sym = _once(sym, opt, spec)
        elif opt == "dq":
            dq = _once(dq, opt, spec)
        else:
            raise SpecError(f"unknown option {opt!r} in {spec!r}. Grammar: {GRAMMAR}")
    if name in MX and granularity not in (None, "g32"):
        raise SpecError(f"{name} has fixed blocks of 32 (OCP MX); write {name!r}, not {spec!r}")
    if sym is not None and name not in INTS:
        raise SpecError(f"{spec!r}: :sym/:asym apply only to int2..int8 ({name} has a sign bit)")
    if dq is not None and name != "nf4":
        raise SpecError(f"{spec!r}: :dq (double quantization of the absmaxes) applies only to nf4")
    return Spec(name, granularity or DEFAULTS[name], asym=sym == "asym", dq=dq is not None)


def canonical(spec: str) -> str:
    """The canonical form of a spec ("int4" -> "int4:g128:sym"); SpecError if invalid."""
    return parse_spec(spec).name


def _once(current, opt, spec):
    if current is not None:
        raise SpecError(
            f"{spec!r} sets {current!r} and {opt!r}; give each kind of option once. Grammar: {GRAMMAR}"
        )
    return opt
