"""A sweep's jobs: one quantization of one model, identified by what it does, so that a finished job is
recognised when the same grid runs again."""

import dataclasses
import hashlib
import itertools
import json
import shlex
from dataclasses import dataclass

from lighten.recipes import Recipe, recipe_from_options


@dataclass(frozen=True)
class Job:
    model: str
    format: str
    algorithm: str | None = None  # None: the format's default (lighten quantize without --algorithm)
    surgery: tuple[str, ...] = ()
    budget: str | None = None  # 4.5bits, 60MB, ...: mixed precision among `candidates`
    candidates: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """A digest of the job's parameters: the same job in any later sweep has the same id."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def recipe(self) -> Recipe:
        return recipe_from_options(
            self.format, self.algorithm, self.surgery, budget=self.budget, candidates=self.candidates
        )

    def command(self, out: str) -> str:
        """The `lighten quantize` command line that makes this job's checkpoint."""
        args = ["lighten", "quantize", self.model, "-f", self.format]
        if self.algorithm:
            args += ["--algorithm", self.algorithm]
        if self.surgery:
            args += ["--surgery", ",".join(self.surgery)]
        if self.budget:
            args += ["--budget", self.budget]
        if self.candidates:
            args += ["--candidates", ",".join(self.candidates)]
        return shlex.join([*args, "-o", out])


def grid(
    models: list[str],
    formats: list[str],
    algorithms: list[str | None] = (None,),
    surgeries: list[tuple[str, ...]] = ((),),
    budgets: list[str | None] = (None,),
    candidates: tuple[str, ...] = (),
) -> list[Job]:
    """Every combination, each validated as `lighten quantize` would validate it (a LightenError names the
    first bad one before anything runs). A budget chooses among `candidates` (or, for a GGUF format,
    llama.cpp's types)."""
    jobs = [
        Job(model, fmt, algorithm, tuple(surgery), budget, candidates if budget else ())
        for model, fmt, algorithm, surgery, budget in itertools.product(
            models, formats, algorithms, surgeries, budgets
        )
    ]
    for job in jobs:
        job.recipe()
    return jobs
