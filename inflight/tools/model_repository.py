"""A copy of a Triton model repository with parameters set in a model's `config.pbtxt`.

`write_model_repository()` copies a repository (`DEFAULT_MODEL_REPOSITORY` is the checkout's
`model_repository/`) and makes its path parameters absolute, so that the server may run in any directory;
`set_parameters()` / `get_parameter()` edit and read the `parameters { key: ... }` entries of a config.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from inflight.tools.triton_install import REPO_ROOT

DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# Parameters holding paths: a relative one is made absolute (the backend would take it from its cwd).
PATH_PARAMETERS = ("model_path", "tokenizer_path")


def _parameter_pattern(key: str) -> re.Pattern[str]:
    # `{ key: "KEY", value: { string_value: "VALUE" } }`: group 1 is everything before VALUE's quotes.
    return re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*,\s*value:\s*\{\s*string_value:\s*)"([^"]*)"')


def set_parameters(config_text: str, parameters: dict[str, str]) -> str:
    """Replace the `string_value` of `parameters { key: ... }` entries of a config.pbtxt."""
    for key, value in parameters.items():
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        config_text, count = _parameter_pattern(key).subn(
            lambda m, v=escaped: f'{m.group(1)}"{v}"', config_text
        )
        if count != 1:
            raise ValueError(f"config.pbtxt has {count} parameters named {key!r} (expected one)")
    return config_text


def get_parameter(config_text: str, key: str) -> str | None:
    """The `string_value` of one parameter, or None when the config does not list it."""
    match = _parameter_pattern(key).search(config_text)
    return match.group(2) if match else None


def write_model_repository(
    src: Path, dst: Path, model: str = "llm", parameters: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Path:  # fmt: skip
    """Copy the repository `src` to `dst` with `parameters` set in `model`'s config; returns `dst`.

    Relative `model_path` / `tokenizer_path` values (given or already in the config) are made absolute
    against `cwd` (default: the current directory), so the server may run in any directory.
    """
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    config = dst / model / "config.pbtxt"
    text = config.read_text()
    values = dict(parameters or {})
    for key in PATH_PARAMETERS:
        value = values.get(key, get_parameter(text, key))
        if value:
            values[key] = str((Path(cwd or Path.cwd()) / value).resolve())
    model_path = values.get("model_path")
    if model_path and not (Path(model_path) / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} is not a Hugging Face checkpoint folder (run `make model`?)")
    config.write_text(set_parameters(text, values))
    return dst
