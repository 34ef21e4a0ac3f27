"""Recipes: a whole quantization job in one YAML file, so a result can be reproduced from a name.

    name: int4-g128-keep-sensitive
    surgery: [fold]                  # lighten.surgery.SURGERY_STEPS, applied in order by apply_surgery
    algorithm: gptq                  # rtn | mse | gptq | awq | imatrix; default: by format (below)
    format: int4:g128                # default spec for every planned weight
    embeddings: false                # also quantize embedding tables (tied lm_heads follow them)
    fallback: false                  # GGUF types: rows that are not whole blocks take llama-quantize's type
    rules:                           # first match wins; `keep` leaves a weight in full precision
      - {pattern: '\\.(0|{last})\\.mlp\\.down_proj\\.weight$', format: int8:channel}
    budget:                          # optional: choose among candidates per weight under a size budget
      size: 4.5bits                  # or bytes: 60MB, 57.2MiB
      candidates: [int3:g128, int4:g128, int8:channel]  # a GGUF format has defaults
      sensitivity: kl                # kl | imatrix; default: imatrix for a GGUF format, kl otherwise
    calibration: {tokens: 512, context: 256}  # default; imatrix: 2048 in windows of 512

Without `algorithm` a recipe runs imatrix (llama.cpp's importance-weighted search) when its format is a GGUF
type that takes importance (q4_0, iq4_nl, q4_k, ...), rtn otherwise (registry.default_algorithm).
A budget whose format is a GGUF type is a GGUF budget: without candidates it chooses among
lighten.plan.GGUF_CANDIDATES (and the format itself), and lighten.plan counts it over the matrices inside the
transformer blocks (llama.cpp's blk.*), as llama.cpp's bits per weight do. In a rule pattern `{last}`
stands for the index of the model's last block, so one recipe fits models of any depth. lm_head stays in
full precision unless a rule names it (lighten.plan.DEFAULT_SKIP). `fallback` stores a weight whose rows
are not whole blocks of its GGUF type as llama-quantize does (GGMLFormat.fallback_for), or keeps it.
`load_recipe("budget-4.5bits")` reads a shipped recipe; a path reads the user's own.

This module is the schema only and imports no torch, so that a bad recipe fails at once; lighten.plan
turns a recipe into the plan for a model.
"""

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lighten.algorithms.registry import ALGORITHMS, DEFAULT_CALIBRATION, default_algorithm
from lighten.errors import LightenError, SpecError
from lighten.formats.spec import GGML, IMPORTANCE_WEIGHTED, canonical
from lighten.surgery import SURGERY_STEPS

KEEP = "keep"
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
BUDGET_FORMS = "bytes (12MB, 12.5MiB, 300KB) or average bits per quantized weight (4.5bits)"
BUDGET_KEYS = {"size", "candidates", "sensitivity"}
# The format of a budget given without one: a GGUF type, so that the budget chooses among llama.cpp's types
# (lighten.plan.GGUF_CANDIDATES, which hold it) and the result exports to GGUF as it is.
BUDGET_FORMAT = "q4_0"
SENSITIVITIES = ("kl", "imatrix")  # lighten.algorithms.sensitivity: measured KL, or imatrix-weighted error
KEYS = (
    "name",
    "description",
    "surgery",
    "algorithm",
    "format",
    "embeddings",
    "fallback",
    "rules",
    "budget",
    "calibration",
)


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex searched in weight names; `{last}` is the last block's index
    format: str  # canonical spec, or KEEP


@dataclass(frozen=True)
class Budget:
    size: str  # "4.5bits", "60MB": parsed with parse_budget against the weights it counts (lighten.plan)
    candidates: tuple[str, ...]  # canonical specs; () for a GGUF budget's default (lighten.plan)
    sensitivity: str = "kl"  # one of SENSITIVITIES


@dataclass(frozen=True)
class Calibration:
    tokens: int = 512
    context: int = 256


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str  # canonical spec
    algorithm: str = "rtn"
    description: str = ""
    surgery: tuple[str, ...] = ()
    embeddings: bool = False
    fallback: bool = False
    rules: tuple[Rule, ...] = ()
    budget: Budget | None = None
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def gguf(self) -> bool:
        """Whether the target is GGUF (the default format is a GGUF block type): a budget then defaults to
        GGUF candidates and counts the block matrices only (lighten.plan)."""
        return self.format in GGML

    def rule_for(self, weight_name: str, n_blocks: int) -> Rule | None:
        """The first rule whose pattern matches `weight_name`, or None."""
        return next((r for r in self.rules if re.search(_pattern(r.pattern, n_blocks), weight_name)), None)


def shipped_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _shipped().iterdir() if p.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a YAML file, or from the shipped recipe of that name; LightenError naming the key."""
    path = Path(path_or_name)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or str(path_or_name) not in shipped_recipes():
            shipped = ", ".join(shipped_recipes())
            raise LightenError(f"no recipe file or shipped recipe {str(path_or_name)!r}; shipped: {shipped}")
        path = _shipped() / f"{path_or_name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LightenError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        problem = f"{e.reason} at byte {e.start}"
        raise LightenError(f"{path} is not UTF-8 text ({problem}): save it as UTF-8") from e
    return parse_recipe(data, default_name=path.name.removesuffix(path.suffix), where=str(path))


def parse_recipe(data, default_name: str = "recipe", where: str = "recipe") -> Recipe:
    """Validate the mapping a recipe file holds; every error names the offending key."""

    def fail(key: str, problem: str):
        raise LightenError(f"{where}: {key}: {problem}")

    def spec(key: str, value) -> str:
        try:
            return canonical(value)
        except SpecError as e:
            raise SpecError(f"{where}: {key}: {e}") from e

    def string_list(key: str, value) -> list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, f"must be a list of strings, got {value!r}")
        return value

    if not isinstance(data, dict):
        fail("(top level)", f"a recipe is a mapping of {', '.join(KEYS)}; got {type(data).__name__}")
    for key in data:
        if key not in KEYS:
            fail(key, f"unknown key; valid keys: {', '.join(KEYS)}")
    if "format" not in data:
        fail("format", "missing: the default format spec, e.g. int4:g128")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            fail(key, "must be a string")
    surgery = string_list("surgery", data.get("surgery", []))
    # Names are checked now, so a typo fails before the model loads; apply_surgery checks their order.
    for i, step in enumerate(surgery):
        if step not in SURGERY_STEPS:
            fail(f"surgery[{i}]", f"unknown step {step!r}; known: {', '.join(SURGERY_STEPS)}")
    default_spec = spec("format", data["format"])
    algorithm = data.get("algorithm") or default_algorithm(default_spec)
    if algorithm not in ALGORITHMS:
        fail("algorithm", f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    for key in ("embeddings", "fallback"):
        if not isinstance(data.get(key, False), bool):
            fail(key, "must be true or false")
    rules = []
    if not isinstance(data.get("rules", []), list):
        fail("rules", "must be a list of {pattern: regex, format: spec | keep}")
    for i, rule in enumerate(data.get("rules", [])):
        key = f"rules[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"pattern", "format"}:
            fail(key, f"must be {{pattern: regex, format: spec | keep}}, got {rule!r}")
        try:
            re.compile(_pattern(str(rule["pattern"]), 1))
        except re.error as e:
            fail(f"{key}.pattern", f"bad regex {rule['pattern']!r}: {e}")
        fmt = KEEP if str(rule["format"]).strip().lower() == KEEP else spec(f"{key}.format", rule["format"])
        rules.append(Rule(str(rule["pattern"]), fmt))
    budget = data.get("budget")
    if budget is not None:
        if not isinstance(budget, dict) or "size" not in budget or not set(budget) <= BUDGET_KEYS:
            fail(
                "budget",
                f"must be {{size: 4.5bits | 60MB, candidates: [specs], sensitivity: kl}}, got {budget!r}",
            )
        try:
            parse_budget(budget["size"], 1)  # the form only: the weight count is the model's
        except LightenError as e:
            fail("budget.size", str(e))
        candidates = ()  # a GGUF budget's default (lighten.plan.gguf_candidates)
        if "candidates" in budget:
            candidates = string_list("budget.candidates", budget["candidates"])
            if len(candidates) < 2:
                fail("budget.candidates", "needs at least two specs to choose between")
            candidates = tuple(spec(f"budget.candidates[{i}]", c) for i, c in enumerate(candidates))
        elif default_spec not in GGML:
            fail("budget.candidates", "missing: list the specs to choose (a GGUF format has defaults)")
        # imatrix for GGUF: llama.cpp's estimate, one pass instead of a forward per probe (11x faster on
        # smollm2-135m at equal tokens; kl's plan was better by 16 % KL: README, Calibration and allocation).
        sensitivity = budget.get("sensitivity", "imatrix" if default_spec in GGML else "kl")
        if sensitivity not in SENSITIVITIES:
            fail("budget.sensitivity", f"{sensitivity!r} is not one of {', '.join(SENSITIVITIES)}")
        budget = Budget(str(budget["size"]), candidates, sensitivity)
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict) or not set(calibration) <= {"tokens", "context"}:
        fail("calibration", f"must be {{tokens: int, context: int}}, got {calibration!r}")
    for key, value in calibration.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            fail(f"calibration.{key}", f"must be an integer >= 2, got {value!r}")
    specs = [default_spec, *(r.format for r in rules)]
    specs += budget.candidates if budget else ()
    if data.get("fallback") and not set(specs) & set(GGML):
        fail(
            "fallback",
            "is for GGUF block types (q4_k, ...), whose blocks may not fit a weight's rows, and this "
            "recipe has none: drop it",
        )
    if algorithm == "imatrix" and not set(specs) & set(IMPORTANCE_WEIGHTED):
        fail(
            "algorithm",
            "imatrix weighs the scale search of GGUF types (q4_0, iq4_nl, q4_k, ...) and this recipe has "
            "none: use one of them, or another algorithm",
        )
    return Recipe(
        name=data.get("name", default_name),
        format=default_spec,
        algorithm=algorithm,
        description=data.get("description", ""),
        surgery=tuple(surgery),
        embeddings=data.get("embeddings", False),
        fallback=data.get("fallback", False),
        rules=tuple(rules),
        budget=budget,
        calibration=Calibration(**{**DEFAULT_CALIBRATION.get(algorithm, {}), **calibration}),
    )


def recipe_from_options(
    format: str,
    algorithm: str | None = None,
    surgery: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
    embeddings: bool = False,
    budget: str | None = None,
    candidates: tuple[str, ...] = (),
    calibration_tokens: int | None = None,
    fallback: bool = False,
    sensitivity: str | None = None,
) -> Recipe:
    """The recipe that command-line options describe, validated like a file: `keep` regexes become
    {pattern, keep} rules; a budget needs candidates unless the format is a GGUF type; no algorithm means
    the format's default."""
    data = {
        "name": "command line",
        "format": format,
        "algorithm": algorithm,
        "surgery": list(surgery),
        "embeddings": embeddings,
        "fallback": fallback,
        "rules": [{"pattern": p, "format": KEEP} for p in keep],
    }
    if budget is not None:
        data["budget"] = {"size": budget}
        if candidates:
            data["budget"]["candidates"] = list(candidates)
        if sensitivity is not None:
            data["budget"]["sensitivity"] = sensitivity
    elif candidates or sensitivity is not None:
        raise LightenError("--candidates and --sensitivity only make sense with --bits or --budget")
    if calibration_tokens is not None:
        data["calibration"] = {"tokens": calibration_tokens}
    return parse_recipe(data, where="options")


def parse_budget(text: str, n_weights: int) -> int:
    """Budget in bytes from "12MB" | "12.5MiB" | "4.5bits"; bits are averaged over the `n_weights`
    weight elements the budget counts and include scales and zero-points."""
    value, unit = _budget_parts(text)
    if unit.startswith("bit"):
        return math.floor(value * n_weights / 8)
    return math.floor(value * UNITS[unit])


def budget_bits(text: str, n_weights: int) -> float:
    """The budget as average bits over `n_weights` elements: exactly the number given in bits."""
    value, unit = _budget_parts(text)
    return value if unit.startswith("bit") else value * UNITS[unit] * 8 / n_weights


def _budget_parts(text: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
    if m is None or m[2] not in (*UNITS, "bit", "bits"):
        raise LightenError(f"budget {text!r} is not understood: give {BUDGET_FORMS}")
    return float(m[1]), m[2]


def _pattern(pattern: str, n_blocks: int) -> str:
    # Plain replace, not str.format: regex braces ({2}, {1,3}) must pass through untouched.
    return pattern.replace("{last}", str(n_blocks - 1))


def _shipped():
    return resources.files("lighten") / "recipes"
