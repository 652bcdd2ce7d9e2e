"""Hardware targets: one TOML file per target in the repository's `targets/` folder.

A target says which device the compiled model runs on, which codegen backend serves it
(`triton` for GPUs, `tvm` for the host CPU), and the hardware figures the cost model needs.
GPU files carry published vendor figures, each with a comment naming its source. The `host`
file asks for calibration instead: its figures are measured on this machine by
micro-benchmarks (`compiler.cost_model.calibrate`) and cached.

Units are in the key names (`_tflops`, `_gbps`, `_us`, ...) so a file reads without a manual.
`load_target` checks the schema and names the field that is missing, mistyped or out of range.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import UserInputError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
_CODEGENS = ("triton", "tvm")
_DEVICES = ("cuda", "cpu")
MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclass(frozen=True)
class Hardware:
    """What the roofline needs, in SI units (FLOP/s, B/s, bytes, seconds).

    `matmul_flops` are dense peaks per input dtype (tensor cores on GPUs; what a large GEMM
    reaches on a CPU); `vector_flops` is the non-matrix fp32 rate that elementwise ops and
    reductions use; `transcendentals` counts exp/log/sin-class results per second. A level of
    `caches` (capacity, bandwidth) serves an op whose working set fits in it; larger working sets
    stream from memory. `achievable` scales peaks to what real kernels reach. With
    `overlapped_units` (GPUs) matmul, vector and transcendental work run on separate units at
    once, so compute time is the largest of the three rather than their sum.
    """

    matmul_flops: dict[str, float]
    vector_flops: float
    transcendentals: float
    memory_bandwidth: float
    memory_bytes: float
    launch_overhead: float
    compute_units: int
    achievable: dict[str, float]
    caches: tuple[tuple[float, float], ...] = ()
    shared_memory_per_unit: float = 0.0
    l2_bytes: float = 0.0
    measured: bool = False
    overlapped_units: bool = False

    def matmul_rate(self, dtype: str) -> float:
        """Achievable matmul FLOP/s for inputs of `dtype` (falls back to the nearest wider type
        the hardware has: fp8 -> fp16 -> fp32, int8 -> fp16)."""
        for d in {"fp8": ("fp8", "fp16", "bf16", "fp32"), "int8": ("int8", "fp16", "fp32")}.get(dtype, (dtype, "fp32")):
            if d in self.matmul_flops:
                return self.matmul_flops[d] * self.achievable["matmul"]
        raise KeyError(dtype)

    def bandwidth_for(self, working_set: float) -> float:
        """Achievable bandwidth for a kernel that touches `working_set` bytes (numeric only)."""
        for capacity, bandwidth in self.caches:
            if working_set <= capacity:
                return bandwidth * self.achievable["memory"]
        return self.memory_bandwidth * self.achievable["memory"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device: str
    codegen: str
    tvm_target: str
    hardware: Hardware | None = field(default=None, compare=False, repr=False)
    calibrate: bool = False

    @property
    def hw(self) -> Hardware:
        """The hardware figures; for a calibrated target, measured on first use and cached."""
        if self.hardware is not None:
            return self.hardware
        if not self.calibrate:
            raise UserInputError(f"target {self.name!r} has no [hardware] table; add one (see targets/h100.toml)")
        from compiler.cost_model.calibrate import host_hardware

        object.__setattr__(self, "hardware", host_hardware())
        return self.hardware  # type: ignore[return-value]


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name: str | Target | Path) -> Target:
    """The target called `name` (or the TOML file at a path); an unknown name or a malformed
    file is a UserInputError naming the field to fix."""
    if isinstance(name, Target):
        return name
    path = Path(name) if isinstance(name, Path) or str(name).endswith(".toml") else TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserInputError(f"unknown target {str(name)!r}; known targets: {', '.join(known_targets())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc}); fix the file") from exc
    return parse_target(data, str(path))


def parse_target(data: dict[str, Any], where: str = "target") -> Target:
    """A Target from a parsed TOML table; raises UserInputError naming the bad field."""
    fields = _Fields(data, where)
    base = {k: fields.string(k) for k in ("name", "description", "device", "codegen", "tvm_target")}
    if base["codegen"] not in _CODEGENS:
        raise UserInputError(f"{where}: field 'codegen' must be one of {_CODEGENS}, got {base['codegen']!r}")
    if base["device"] not in _DEVICES:
        raise UserInputError(f"{where}: field 'device' must be one of {_DEVICES}, got {base['device']!r}")
    fields.known(("name", "description", "device", "codegen", "tvm_target", "calibrate", "hardware"))
    calibrate = fields.boolean("calibrate")
    if "hardware" not in data:
        if not calibrate:
            raise UserInputError(f"{where}: field 'hardware' is missing; add a [hardware] table or set calibrate = true")
        return Target(**base, calibrate=True)
    return Target(**base, hardware=parse_hardware(fields.table("hardware")), calibrate=calibrate)


_HARDWARE_KEYS = (
    "vector_tflops", "transcendental_tops", "memory_bandwidth_gbps", "memory_gb", "launch_overhead_us",
    "compute_units", "cache_mib", "cache_bandwidth_gbps", "shared_memory_per_unit_kib", "l2_mib",
    "measured", "overlapped_units", "matmul_tflops", "achievable",
)


def parse_hardware(hw: _Fields) -> Hardware:
    hw.known(_HARDWARE_KEYS)
    matmul = hw.table("matmul_tflops")
    matmul.known(MATMUL_DTYPES, what="dtype")
    matmul.number("fp32")  # required: every target has an fp32 rate
    flops = {d: matmul.number(d) * 1e12 for d in MATMUL_DTYPES if d in matmul.data}
    achievable = hw.table("achievable")
    achievable.known(("matmul", "vector", "memory"))
    caches = ()
    if "cache_mib" in hw.data or "cache_bandwidth_gbps" in hw.data:
        caches = ((hw.number("cache_mib") * 2**20, hw.number("cache_bandwidth_gbps") * 1e9),)
    return Hardware(
        matmul_flops=flops,
        vector_flops=hw.number("vector_tflops") * 1e12,
        transcendentals=hw.number("transcendental_tops") * 1e12,
        memory_bandwidth=hw.number("memory_bandwidth_gbps") * 1e9,
        memory_bytes=hw.number("memory_gb") * 1e9,
        launch_overhead=hw.number("launch_overhead_us") * 1e-6,
        compute_units=hw.integer("compute_units"),
        achievable={k: achievable.fraction(k) for k in ("matmul", "vector", "memory")},
        caches=caches,
        shared_memory_per_unit=hw.number("shared_memory_per_unit_kib", optional=True) * 2**10,
        l2_bytes=hw.number("l2_mib", optional=True) * 2**20,
        measured=hw.boolean("measured"),
        overlapped_units=hw.boolean("overlapped_units"),
    )


@dataclass
class _Fields:
    """A TOML table with typed accessors whose errors name the dotted field."""

    data: dict[str, Any]
    where: str
    prefix: str = ""

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def string(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str):
            raise UserInputError(f"{self.where}: field {self._name(key)!r} is missing or not a string")
        return value

    def number(self, key: str, optional: bool = False) -> float:
        value = self.data.get(key)
        if value is None and optional:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{self.where}: field {self._name(key)!r} is missing or not a number")
        if not math.isfinite(value) or value <= 0:
            raise UserInputError(f"{self.where}: field {self._name(key)!r} must be positive, got {value}")
        return float(value)

    def integer(self, key: str) -> int:
        value = self.number(key)
        if not float(value).is_integer():
            raise UserInputError(f"{self.where}: field {self._name(key)!r} must be a whole number, got {value}")
        return int(value)

    def boolean(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise UserInputError(f"{self.where}: field {self._name(key)!r} must be true or false, got {value!r}")
        return value

    def known(self, keys: tuple[str, ...], what: str = "field") -> None:
        """Reject keys outside `keys`: a misspelt optional field must not silently become 0."""
        for key in self.data:
            if key not in keys:
                raise UserInputError(f"{self.where}: unknown {what} {key!r} (field {self._name(key)!r}); expected one of {', '.join(keys)}")

    def fraction(self, key: str) -> float:
        value = self.number(key)
        if value > 1:
            raise UserInputError(f"{self.where}: field {self._name(key)!r} is a fraction of peak in (0, 1], got {value}")
        return value

    def table(self, key: str) -> _Fields:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise UserInputError(f"{self.where}: field {self._name(key)!r} is missing or not a table")
        return _Fields(value, self.where, f"{self._name(key)}.")
