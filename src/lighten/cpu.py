"""What this CPU is: the probes that choose kernels and layouts."""

from pathlib import Path

AMX_FLAGS = ("amx_tile", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def has_amx(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has AMX tiles (Linux /proc/cpuinfo flags; False where there is no such file)."""
    try:
        with cpuinfo.open() as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in AMX_FLAGS)


def describe(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name and widest vector extension, e.g. "AMD EPYC (AVX2)", for benchmark tables."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    widest = next(
        (
            name
            for flag, name in [("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
            if flag in flags
        ),
        "no AVX2",
    )
    return f"{fields.get('model name', 'unknown CPU')} ({widest})"
