"""The Triton server inside the installed `nvidia-pytriton` wheel, and the environments its binaries need.

`find_triton()` locates `tritonserver`, its libraries and the Python backend stub for the running Python;
`backend_directory()` assembles the `--backend-directory`; `server_env()` / `perf_env()` are the
environments of `tritonserver` and of `perf_analyzer` (docs/serving.md explains each piece).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("INFLIGHT_CACHE_DIR", REPO_ROOT / ".cache"))


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the server live inside the installed `nvidia-pytriton` wheel."""

    binary: Path  # pytriton/tritonserver/bin/tritonserver
    libs_dir: Path  # nvidia_pytriton.libs/
    python_backend_dir: Path  # pytriton/tritonserver/backends/python/
    stub: Path  # pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub


def find_triton() -> TritonInstall:
    """Locate tritonserver in the installed wheel; a clear RuntimeError if it is missing."""
    for site in map(Path, {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        root = site / "pytriton" / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not stub.is_file():
                raise RuntimeError(f"nvidia-pytriton has no Python backend stub for Python {version}")
            binary, libs = root / "bin" / "tritonserver", site / "nvidia_pytriton.libs"
            return TritonInstall(binary, libs, root / "backends" / "python", stub)
    raise RuntimeError("tritonserver not found: install the serve extra (`pip install -e '.[serve]'`)")


def backend_directory(install: TritonInstall | None = None) -> Path:
    """`<cache>/triton/backends/` with `python/` = the wheel's Python backend + the stub for this Python."""
    install = install or find_triton()
    target = CACHE_DIR / "triton" / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [*sorted(install.python_backend_dir.glob("*.so")), *install.python_backend_dir.glob("*.py")]
    for src in [*sources, install.stub]:
        dst = target / src.name
        if not dst.is_file() or _signature(dst) != _signature(src):
            # NOTE: copy to a temp name then rename, so a concurrent start never sees a half-written file.
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
    return target.parent


def _signature(path: Path) -> tuple[int, float]:
    return path.stat().st_size, path.stat().st_mtime


def _prepend(env: dict[str, str], name: str, *paths: Path | str) -> None:
    parts = [str(p) for p in paths] + [p for p in env.get(name, "").split(os.pathsep) if p]
    env[name] = os.pathsep.join(dict.fromkeys(parts))


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs.

    NOTE: LD_LIBRARY_PATH starts with the interpreter's LIBDIR: otherwise the stub links the system
    libpython (another patch release) against our standard library and `multiprocessing` breaks. PATH
    starts with this environment's bin/: the stub takes its site-packages from the first python3 on PATH.
    """
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    _prepend(env, "LD_LIBRARY_PATH", *([libdir] if libdir else []), find_triton().libs_dir)
    _prepend(env, "PATH", Path(sys.prefix) / "bin")
    return env


def perf_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the `perf_analyzer` binary of tritonclient[all] (and genai-perf, which runs it).

    perf_analyzer wants `libb64.so.0d` and `libcudart.so.12`; the wheel has both under hashed names, so a
    cache folder of symlinks with the plain names goes first on LD_LIBRARY_PATH.
    """
    libs = find_triton().libs_dir
    folder = CACHE_DIR / "triton" / "perf_libs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise RuntimeError(f"{pattern} not found in {libs}")
        link = folder / name
        if not link.is_symlink() or Path(os.readlink(link)) != matches[0]:
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(matches[0])
            os.replace(tmp, link)  # NOTE: atomic, for concurrent callers
    env = dict(os.environ if base is None else base)
    _prepend(env, "LD_LIBRARY_PATH", folder)
    _prepend(env, "PATH", Path(sys.prefix) / "bin")
    return env
