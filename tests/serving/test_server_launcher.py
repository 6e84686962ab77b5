"""The server launcher's pieces that need no running server: repository copy, backend dir, envs."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from inflight.tools.model_repository import (
    DEFAULT_MODEL_REPOSITORY,
    get_parameter,
    set_parameters,
    write_model_repository,
)
from inflight.tools.server import TritonServer
from inflight.tools.triton_install import REPO_ROOT, backend_directory, perf_env, server_env


def test_model_repository_copy_gets_absolute_model_path(tmp_path: Path, smollm2_path: Path) -> None:
    repo = write_model_repository(
        DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", parameters={"max_model_len": "512"}, cwd=REPO_ROOT
    )
    text = (repo / "llm" / "config.pbtxt").read_text()
    assert get_parameter(text, "model_path") == str(smollm2_path.resolve())
    assert get_parameter(text, "max_model_len") == "512"
    assert (repo / "llm" / "1" / "model.py").is_file()
    # The original is untouched.
    original = (DEFAULT_MODEL_REPOSITORY / "llm" / "config.pbtxt").read_text()
    assert get_parameter(original, "model_path") == ".cache/models/SmolLM2-135M-Instruct"


def test_relative_model_path_is_taken_from_cwd(tmp_path: Path, smollm2_path: Path) -> None:
    cwd = smollm2_path.parent
    repo = write_model_repository(
        DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", parameters={"model_path": smollm2_path.name}, cwd=cwd
    )
    assert get_parameter((repo / "llm" / "config.pbtxt").read_text(), "model_path") == str(smollm2_path)


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        set_parameters(
            (DEFAULT_MODEL_REPOSITORY / "llm" / "config.pbtxt").read_text(), {"no_such_option": "1"}
        )
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        write_model_repository(
            DEFAULT_MODEL_REPOSITORY, tmp_path / "r", parameters={"model_path": str(tmp_path)}
        )


def test_backend_directory_and_environments() -> None:
    backends = backend_directory()
    names = {p.name for p in (backends / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"} <= names
    env = server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x"})
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == sysconfig.get_config_var("LIBDIR") and libs[1].endswith("nvidia_pytriton.libs")
    assert libs[-1] == "/x" and env["PATH"].split(os.pathsep)[0].endswith("bin")
    perf = perf_env({})
    folder = Path(perf["LD_LIBRARY_PATH"].split(os.pathsep)[0])
    assert (folder / "libb64.so.0d").resolve().is_file() and (folder / "libcudart.so.12").resolve().is_file()


def test_a_server_used_as_a_context_manager_is_stopped_on_exit() -> None:
    """``with TritonServer.start(...) as server:`` (its docstring's use) stops the process at the block's end;
    a process that ignores nothing stands in for tritonserver (SIGINT ends it)."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with TritonServer(process, (0, 0, 0), None) as server:
            assert server.process.poll() is None
        assert process.poll() is not None
    finally:
        process.kill()
        process.wait()
