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
