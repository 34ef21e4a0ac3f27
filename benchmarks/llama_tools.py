"""llama.cpp's own `llama-quantize` and `llama-imatrix`, built once from the llama.cpp that the installed
llama-cpp-python vendors, so that the tools quantize with the same code that later runs the files.

    python benchmarks/llama_tools.py        # build if missing, print the paths

Measured on a 2-core machine shared with other jobs (load 6-9): 1.5 minutes to download the sdist (pip
prepares its metadata), 30 minutes of compiling (16 CPU-minutes).

The binaries go to `$LIGHTEN_CACHE` (default ~/.cache/lighten)/llama-tools/<llama-cpp-python version>/. The
build happens in a temp folder beside it (pip downloads the sdist, cmake builds the two targets statically
linked, so they do not depend on the build tree) and the finished folder is renamed into place: a failed or
killed build leaves nothing that looks usable. A prerequisite of benchmarks/gguf_quality.py, not of tests.
"""

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lighten.errors import LightenError
from lighten.models.builtin import cache_dir

TOOLS = ("llama-quantize", "llama-imatrix")
SDIST_ONLY = ("--no-deps", "--no-binary", ":all:")  # the source, with vendor/llama.cpp
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: the build tree can go
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no downloads from hubs: neither curl nor HTTPS is needed
)


def llama_tools() -> dict[str, Path]:
    """{tool name: path of its binary}, building them first if this llama-cpp-python's are not cached."""
    version = importlib.metadata.version("llama-cpp-python")
    home = cache_dir() / "llama-tools" / version
    if not all((home / tool).is_file() for tool in TOOLS):
        home.parent.mkdir(parents=True, exist_ok=True)
        _build(version, home)
    return {tool: home / tool for tool in TOOLS}


def _build(version: str, home: Path) -> None:
    # Whatever cmake is on the PATH: llama-cpp-python's own build used a cmake from pip's isolated build
    # environment, which is gone once it is installed.
    cmake = shutil.which("cmake")
    if cmake is None:
        raise LightenError(
            "building llama.cpp's tools needs cmake: `pip install cmake` or `apt-get install cmake`"
        )
    log = home.with_name(f"build-{version}.log")
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=home.parent) as tmp:
        tmp = Path(tmp)
        print(f"building {', '.join(TOOLS)} from llama-cpp-python {version} (log: {log})", file=sys.stderr)
        with log.open("w") as out:
            sdist = f"llama-cpp-python=={version}"
            _step(out, log, [sys.executable, "-m", "pip", "download", *SDIST_ONLY, sdist, "-d", str(tmp)])
            source = _unpack_llama_cpp(next(tmp.glob("llama_cpp_python-*.tar.gz")), tmp)
            build = tmp / "build"
            _step(out, log, [cmake, "-S", str(source), "-B", str(build), *CMAKE_OPTIONS])
            _step(out, log, [cmake, "--build", str(build), "--target", *TOOLS, "--parallel", "2"])
        staged = tmp / "tools"
        staged.mkdir()
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, staged / tool)
        shutil.rmtree(home, ignore_errors=True)  # a folder missing a tool (an older script's)
        staged.rename(home)


def _step(out, log: Path, command: list[str]) -> None:
    """Run one build command with its output appended to the log; a failure names it and quotes the log."""
    print(f"$ {' '.join(command)}", file=out, flush=True)
    if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise LightenError(
            f"building llama.cpp's tools failed at `{' '.join(command[:3])} ...`:\n{tail}(whole log: {log})"
        )


def _unpack_llama_cpp(sdist: Path, into: Path) -> Path:
    """Extract the sdist's vendor/llama.cpp only (the rest is llama-cpp-python's Python package)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(into, members=members, filter="data")
    return into / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"


if __name__ == "__main__":
    try:
        for name, path in llama_tools().items():
            print(f"{name}: {path}")
    except LightenError as e:
        sys.exit(f"error: {e}")
