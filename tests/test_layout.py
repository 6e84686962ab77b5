"""The checkout's layout: top-level folders installed as `inflight.*` through the symlinks in `inflight/`,
and none of them shadows an installed package when the checkout root is first on `sys.path` (issue 19).

`backend/` and `kernels/` have no `__init__.py`: from the checkout root (`python`, `python -m`, the Triton
stub's working directory) they are PEP 420 namespace portions, and an installed regular package of the same
name (Hugging Face's `kernels`, which transformers imports) wins over them whatever the sys.path order.

`python -m tests.test_layout` prints where the probed modules came from (the tests run it from the root).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folders that must stay namespace portions: their names are (or may be) installed packages' too.
NAMESPACE_PORTIONS = ("backend", "kernels")
SUBPACKAGES = ("backend", "batching", "kernels", "client", "gateway")

PROBE = """
import json, sys
import transformers, kernels
import transformers.integrations.hub_kernels  # `from kernels import ...` (HF's names) when kernels is there
import inflight, inflight.kernels.ops, inflight.backend.engine.llm
print(json.dumps({
    "sys_path_0": sys.path[0], "kernels": kernels.__file__, "inflight": inflight.__file__,
    "ops": inflight.kernels.ops.__file__, "llm": inflight.backend.engine.llm.__file__,
}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that moves the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def _probe(args: list[str], env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    how = "python -c PROBE" if args[0] == "-c" else f"python {' '.join(args)}"
    assert done.returncode == 0, f"{how} from the checkout root failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _installed_kernels() -> Path | None:
    """Hugging Face's `kernels` package folder where it is installed (transformers >= 5.25 depends on it)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


def _fake_kernels(folder: Path) -> Path:
    """A regular package named `kernels` with the names transformers imports from HF's (they are None)."""
    package = folder / "kernels"
    package.mkdir(parents=True)
    names = (
        "CUDAProperties Device KernelizeFallback LayerRepository LocalLayerRepository Mode ROCMProperties "
        "register_kernel_mapping replace_kernel_forward_from_hub use_kernel_forward_from_hub "
        "use_kernel_mapping get_kernel kernelize use_kernelized_func"
    ).split()
    (package / "__init__.py").write_text("".join(f"{n} = None\n" for n in names))
    return package


def _assert_checkout_modules(found: dict[str, str]) -> None:
    assert Path(found["inflight"]).resolve() == REPO / "inflight" / "__init__.py"
    assert Path(found["ops"]).resolve() == REPO / "kernels" / "ops.py"
    assert Path(found["llm"]).resolve() == REPO / "backend" / "engine" / "llm.py"


def _expected_kernels(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """HF's installed `kernels`; without it, a fake regular one on PYTHONPATH (after the cwd on sys.path)."""
    installed = _installed_kernels()
    if installed is not None:
        return installed, _clean_env()
    fake = _fake_kernels(tmp_path / "site")
    return fake, _clean_env(PYTHONPATH=str(fake.parent))


def test_installed_kernels_wins_from_the_checkout_root_with_c(tmp_path: Path) -> None:
    expected, env = _expected_kernels(tmp_path)
    found = _probe(["-c", PROBE], env)
    assert found["sys_path_0"] == "", "python -c puts the current directory (the checkout root) first"
    assert Path(found["kernels"]).resolve().parent == expected, (
        f"`import kernels` from the checkout root gave {found['kernels']}, not {expected}"
    )
    _assert_checkout_modules(found)


def test_installed_kernels_wins_from_the_checkout_root_with_m(tmp_path: Path) -> None:
    expected, env = _expected_kernels(tmp_path)
    found = _probe(["-m", "tests.test_layout"], env)
    assert Path(found["sys_path_0"]).resolve() == REPO, "python -m puts the checkout root first"
    assert Path(found["kernels"]).resolve().parent == expected, (
        f"`import kernels` under `python -m` gave {found['kernels']}, not {expected}"
    )
    _assert_checkout_modules(found)


@pytest.mark.parametrize("mode", ["-c", "-m"])
def test_a_regular_kernels_package_after_the_root_wins(tmp_path: Path, mode: str) -> None:
    """Whether or not HF's is installed: a regular `kernels` anywhere after the root beats the checkout's."""
    fake = _fake_kernels(tmp_path / "site")
    found = _probe(
        ["-c", PROBE] if mode == "-c" else ["-m", "tests.test_layout"],
        _clean_env(PYTHONPATH=str(fake.parent)),
    )
    assert Path(found["kernels"]).resolve() == fake / "__init__.py"
    _assert_checkout_modules(found)


def _pyproject(expand: bool) -> dict:
    """pyproject.toml as setuptools reads it (expanded: `packages` is the list its find settings give)."""
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' deprecation notes on unrelated fields
        return read_configuration(REPO / "pyproject.toml", expand=expand)


def _own_distribution() -> str:
    return _pyproject(expand=False)["project"]["name"]


def test_no_top_level_regular_package_shadows_an_installed_one() -> None:
    """A top-level folder with an `__init__.py` wins over any installed package of its name when the root
    is first on sys.path: such a folder must have a name no installed distribution provides."""
    provided = importlib.metadata.packages_distributions()
    own = _own_distribution()
    offenders = {
        folder.name: sorted(set(provided[folder.name]))
        for folder in sorted(REPO.iterdir())
        if folder.is_dir() and folder.name.isidentifier() and (folder / "__init__.py").is_file()
        if set(provided.get(folder.name, ())) - {own}
    }
    assert not offenders, (
        "top-level regular packages named like installed ones (they shadow them from the checkout root; "
        f"remove their __init__.py or rename them): {offenders}"
    )


@pytest.mark.parametrize("name", NAMESPACE_PORTIONS)
def test_named_folders_are_namespace_portions(name: str) -> None:
    assert (REPO / name).is_dir()
    assert not (REPO / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes {name}/ a regular package that shadows an installed `{name}` from the "
        "checkout root; it must stay a namespace portion"
    )


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackages_are_symlinks_to_the_top_level_folders(name: str) -> None:
    link = REPO / "inflight" / name
    assert link.is_symlink() and os.readlink(link) == f"../{name}", f"inflight/{name} -> ../{name}"
    assert link.resolve() == REPO / name


def test_setuptools_finds_every_subpackage() -> None:
    """pyproject's find settings reach every folder of Python files under inflight/ (through the links)."""
    assert _pyproject(expand=False)["tool"]["setuptools"]["packages"]["find"].get("namespaces") is True
    found = set(_pyproject(expand=True)["tool"]["setuptools"]["packages"])
    folders = set()
    # NOTE: rglob does not follow the links (Python 3.11): each linked folder is walked on its own.
    for top, package in [(REPO / "inflight", ("inflight",))] + [
        (REPO / name, ("inflight", name)) for name in SUBPACKAGES
    ]:
        for path in top.rglob("*.py"):
            parts = path.parent.relative_to(top).parts
            if all(part.isidentifier() and part != "__pycache__" for part in parts):
                folders.add(".".join(package + parts))
    assert {f"inflight.{name}" for name in SUBPACKAGES} <= found
    assert folders <= found, f"not found by setuptools: {sorted(folders - found)}"


if __name__ == "__main__":
    exec(PROBE)
