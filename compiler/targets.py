"""Hardware targets: one TOML file per target in the repository's `targets/` folder.

A target says which device the compiled model runs on and which codegen backend serves it
(`triton` for GPUs, `tvm` for the host CPU). The cost model adds the hardware figures.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import UserInputError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
_CODEGENS = ("triton", "tvm")
_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device: str
    codegen: str
    tvm_target: str


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name: str | Target) -> Target:
    """The target called `name`; an unknown name or a malformed file is a UserInputError."""
    if isinstance(name, Target):
        return name
    path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserInputError(
            f"unknown target {name!r}; known targets: {', '.join(known_targets())}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc}); fix the file") from exc
    for key in ("name", "description", "device", "codegen", "tvm_target"):
        if not isinstance(data.get(key), str):
            raise UserInputError(f"{path}: field {key!r} is missing or not a string")
    if data["codegen"] not in _CODEGENS:
        raise UserInputError(f"{path}: codegen must be one of {_CODEGENS}, got {data['codegen']!r}")
    if data["device"] not in _DEVICES:
        raise UserInputError(f"{path}: device must be one of {_DEVICES}, got {data['device']!r}")
    return Target(**{k: data[k] for k in ("name", "description", "device", "codegen", "tvm_target")})
