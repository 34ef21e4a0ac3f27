"""What this CPU is: the probes that choose kernels and layouts."""

from pathlib import Path

AMX_FLAGS = ("amx_tile", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def has_amx(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has AMX tiles (Linux /proc/cpuinfo flags; False where there is no such file)."""
    flags = _fields(cpuinfo).get("flags", "").split()
    return any(flag in flags for flag in AMX_FLAGS)


def describe(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name and widest vector extension, e.g. "AMD EPYC (AVX2)", for benchmark tables."""
    fields = _fields(cpuinfo)
    flags = fields.get("flags", "").split()
    extensions = [("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
    widest = next((name for flag, name in extensions if flag in flags), "no AVX2")
    return f"{fields.get('model name', 'unknown CPU')} ({widest})"


def _fields(cpuinfo: Path) -> dict[str, str]:
    """The first processor's "key : value" lines of a /proc/cpuinfo file ({} where there is none)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for key, _, value in (line.partition(":") for line in lines if ":" in line):
        fields.setdefault(key.strip(), value.strip())
    return fields
