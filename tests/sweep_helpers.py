"""The jobs of the sweep tests' grid on a tiny model."""

from lighten.sweep.grid import Job, grid

TOKENS = 256  # held-out tokens each job is evaluated on


def jobs_of(model) -> list[Job]:
    # 2 formats x 2 algorithms, and q4_k, whose 256-blocks do not fit the tiny rows of 64: it fails
    return grid([str(model)], ["int8", "int4:g32"], ["rtn", "gptq"]) + [Job(str(model), "q4_k")]
