"""Tests of the hardware targets (compiler.targets) and the host calibration
(compiler.cost_model.calibrate): the shipped TOMLs load and carry the vendors' datasheet
figures; calibration is quick, plausible, cached and survives a damaged store; a malformed
target file is a UserInputError naming the dotted field to fix.

(The CLI's `--target nosuch` exit status is tested in test_cli.py.)"""

from __future__ import annotations

import copy
import json
import math
import re
import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest

from compiler.cache import Store
from compiler.cost_model import calibrate
from compiler.errors import UserInputError
from compiler.targets import MATMUL_DTYPES, TARGETS_DIR, Hardware, Target, known_targets, load_target

GPU_TARGETS = ("a100", "h100", "h200")


# -- the shipped targets ---------------------------------------------------------------------


def test_known_targets_are_the_four_shipped_files():
    assert known_targets() == ["a100", "h100", "h200", "host"]


@pytest.mark.parametrize("name", ["a100", "h100", "h200", "host"])
def test_every_target_loads_by_name_and_by_path(name):
    target = load_target(name)
    assert target.name == name
    assert load_target(TARGETS_DIR / f"{name}.toml") == target
    assert load_target(str(TARGETS_DIR / f"{name}.toml")) == target
    assert load_target(target) is target


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_gpu_targets_carry_a_full_hardware_table(name):
    target = load_target(name)
    hw = target.hardware
    assert (target.device, target.codegen, target.calibrate) == ("cuda", "triton", False)
    assert target.tvm_target.startswith("cuda -arch=sm_")
    assert isinstance(hw, Hardware) and not hw.measured
    assert set(hw.matmul_flops) <= set(MATMUL_DTYPES) and "fp32" in hw.matmul_flops
    for value in (*hw.matmul_flops.values(), hw.vector_flops, hw.transcendentals, hw.memory_bandwidth,
                  hw.memory_bytes, hw.launch_overhead, hw.shared_memory_per_unit, hw.l2_bytes):
        assert value > 0
    assert hw.compute_units > 0
    assert set(hw.achievable) == {"matmul", "vector", "memory"}
    assert all(0 < f <= 1 for f in hw.achievable.values())
    # tensor cores: 16-bit matmul well above the fp32 CUDA-core rate
    assert hw.matmul_flops["bf16"] == hw.matmul_flops["fp16"] > 10 * hw.matmul_flops["fp32"]


def test_h100_datasheet_figures():
    hw = load_target("h100").hardware
    assert hw.matmul_flops["bf16"] == pytest.approx(989.4e12)  # dense BF16, SXM5
    assert hw.matmul_flops["fp8"] == pytest.approx(1978.9e12)
    assert hw.memory_bandwidth == pytest.approx(3.35e12)  # HBM3
    assert hw.memory_bytes == pytest.approx(80e9)
    assert hw.compute_units == 132
    assert hw.l2_bytes == 50 * 2**20


def test_a100_datasheet_figures():
    hw = load_target("a100").hardware
    assert hw.matmul_flops["bf16"] == pytest.approx(312e12)
    assert hw.matmul_flops["tf32"] == pytest.approx(156e12)
    assert hw.memory_bandwidth == pytest.approx(2039e9)  # HBM2e, 80GB SXM4
    assert hw.compute_units == 108
    assert "fp8" not in hw.matmul_flops  # no FP8 tensor cores on Ampere
    assert hw.matmul_rate("fp8") == hw.matmul_rate("fp16")  # falls back to the 16-bit rate


def test_h200_is_h100_compute_with_hbm3e():
    h100, h200 = load_target("h100").hardware, load_target("h200").hardware
    assert h200.memory_bandwidth == pytest.approx(4.8e12)
    assert h200.memory_bytes == pytest.approx(141e9)
    assert h200.matmul_flops == h100.matmul_flops
    assert (h200.vector_flops, h200.transcendentals, h200.compute_units) == (h100.vector_flops, h100.transcendentals, h100.compute_units)


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_every_gpu_figure_names_its_source(name):
    """Each number in a GPU file's hardware tables has a comment saying where it comes from."""
    section = ""
    for line in (TARGETS_DIR / f"{name}.toml").read_text().splitlines():
        if line.startswith("["):
            section = line.split("]")[0] + "]"
        elif section.startswith("[hardware") and re.match(r"\s*\w+\s*=\s*[-\d.]", line):
            assert "#" in line and line.split("#", 1)[1].strip(), f"{name}.toml {section}: no source for {line!r}"


def test_host_target_asks_for_calibration():
    target = load_target("host")
    assert (target.device, target.codegen, target.tvm_target) == ("cpu", "tvm", "llvm")
    assert target.calibrate and target.hardware is None


# -- host calibration --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One real calibration into a fresh store: (store, hardware, seconds it took)."""
    store = Store(tmp_path_factory.mktemp("calibration") / "s.sqlite")
    start = time.perf_counter()
    hw = calibrate.host_hardware(store=store)
    return store, hw, time.perf_counter() - start


def recorded(store: Store) -> dict[str, Any]:
    """The raw measurement the calibration cached in `store`."""
    data = store.get(calibrate._NAMESPACE, calibrate.machine_key())
    assert isinstance(data, dict)
    return data


def forbid_measuring(monkeypatch):
    def measure():
        raise AssertionError("calibration measured again instead of using the cache")

    monkeypatch.setattr(calibrate, "measure", measure)


def count_measurements(monkeypatch, data: dict[str, Any]) -> list[int]:
    """Replace `measure` by a stand-in returning `data`; the list grows by one per call."""
    calls: list[int] = []

    def measure():
        calls.append(1)
        return copy.deepcopy(data)

    monkeypatch.setattr(calibrate, "measure", measure)
    return calls


def test_calibration_is_quick_and_positive(calibrated):
    _, hw, seconds = calibrated
    assert seconds < 60
    assert hw.measured
    for dtype in ("fp32", "bf16", "fp16"):
        assert hw.matmul_flops[dtype] > 0
    assert hw.vector_flops > 0 and hw.transcendentals > 0
    assert hw.memory_bandwidth > 0 and hw.memory_bytes > 2**30
    assert 0 < hw.launch_overhead < 1e-3
    assert hw.compute_units >= 1
    ((cache_bytes, cache_bandwidth),) = hw.caches
    assert cache_bytes > 0 and cache_bandwidth > 0
    assert all(f == 1.0 for f in hw.achievable.values())


def test_calibration_figures_are_plausible(calibrated):
    _, hw, _ = calibrated
    figures = f"measured {hw}"
    assert hw.matmul_flops["fp32"] > 1e9, figures  # any CPU of the last 20 years GEMMs faster than 1 GFLOP/s
    ((_, cache_bandwidth),) = hw.caches
    assert cache_bandwidth >= hw.memory_bandwidth, figures


def test_second_calibration_comes_from_the_cache(calibrated, monkeypatch):
    store, hw, seconds = calibrated
    forbid_measuring(monkeypatch)
    start = time.perf_counter()
    again = calibrate.host_hardware(store=Store(store.path))
    assert time.perf_counter() - start < min(1.0, seconds / 5)
    assert again == hw


def test_refresh_measures_again(calibrated, monkeypatch):
    store, _, _ = calibrated
    data = recorded(store)
    faster = {**data, "matmul_flops": {**data["matmul_flops"], "fp32": data["matmul_flops"]["fp32"] * 2}}
    calls = count_measurements(monkeypatch, faster)
    fresh = Store(store.path.with_name("refresh.sqlite"))
    fresh.put(calibrate._NAMESPACE, calibrate.machine_key(), data)
    hw = calibrate.host_hardware(refresh=True, store=fresh)
    assert calls == [1]
    assert hw.matmul_flops["fp32"] == faster["matmul_flops"]["fp32"]
    assert recorded(fresh) == faster


def test_damaged_store_is_moved_aside_and_rebuilt(calibrated, tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"\x00garbage, not an SQLite database\xff" * 200)
    calls = count_measurements(monkeypatch, recorded(calibrated[0]))
    hw = calibrate.host_hardware(store=Store(path))
    assert calls == [1] and hw == calibrated[1]
    assert path.with_suffix(".damaged").read_bytes().startswith(b"\x00garbage")
    with sqlite3.connect(path) as db:  # a real database again, holding the new record
        assert db.execute("SELECT count(*) FROM records").fetchone() == (1,)
    calibrate.host_hardware(store=Store(path))
    assert calls == [1]  # and the rebuilt store serves the next call


@pytest.mark.parametrize("stale", [{"version": calibrate.CALIBRATION_VERSION - 1}, "not a dict", {"version": calibrate.CALIBRATION_VERSION}])
def test_stale_or_partial_record_is_measured_again(calibrated, tmp_path, monkeypatch, stale):
    store = Store(tmp_path / "s.sqlite")
    store.put(calibrate._NAMESPACE, calibrate.machine_key(), stale)
    calls = count_measurements(monkeypatch, recorded(calibrated[0]))
    assert calibrate.host_hardware(store=store) == calibrated[1]
    assert calls == [1]


def test_host_target_calibrates_lazily_into_the_cache_dir(calibrated, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    calls = count_measurements(monkeypatch, recorded(calibrated[0]))
    target = load_target("host")
    assert calls == []  # loading does not measure
    assert target.hw == calibrated[1] and target.hw is target.hw
    assert calls == [1]
    assert (tmp_path / "store.sqlite").is_file()


# -- malformed target files ----------------------------------------------------------------------


def dump_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer for target files (scalars, tables, sub-tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)

    def table(prefix: str, t: dict[str, Any]) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in t.items() if not isinstance(v, dict)]
        for k, v in t.items():
            if isinstance(v, dict):
                lines += ["", f"[{prefix}{k}]", *table(f"{prefix}{k}.", v)]
        return lines

    return "\n".join(table("", data)) + "\n"


def h100_data() -> dict[str, Any]:
    return tomllib.loads((TARGETS_DIR / "h100.toml").read_text())


def write_target(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = h100_data()
    edit(data)
    path = tmp_path / "custom.toml"
    path.write_text(dump_toml(data))
    return path


def test_dump_toml_round_trips_the_h100_file(tmp_path):
    path = write_target(tmp_path, lambda d: None)
    assert tomllib.loads(path.read_text()) == h100_data()
    assert load_target(path) == load_target("h100")
    assert load_target(path).hardware == load_target("h100").hardware


def _set(*keys: str, to: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = to

    return edit


def _delete(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for k in keys[:-1]:
            data = data[k]
        del data[keys[-1]]

    return edit


# (edit, the dotted field the message must name, other words it must contain)
BAD_FILES = {
    "missing-hardware-table": (_delete("hardware"), "'hardware'", ("calibrate",)),
    "missing-memory-bandwidth": (_delete("hardware", "memory_bandwidth_gbps"), "'hardware.memory_bandwidth_gbps'", ("missing",)),
    "string-for-number": (_set("hardware", "memory_gb", to="80"), "'hardware.memory_gb'", ("not a number",)),
    "bool-for-number": (_set("hardware", "compute_units", to=True), "'hardware.compute_units'", ("not a number",)),
    "negative-number": (_set("hardware", "launch_overhead_us", to=-4.0), "'hardware.launch_overhead_us'", ("positive", "-4.0")),
    "zero": (_set("hardware", "matmul_tflops", "bf16", to=0), "'hardware.matmul_tflops.bf16'", ("positive",)),
    "fraction-above-one": (_set("hardware", "achievable", "matmul", to=1.5), "'hardware.achievable.matmul'", ("1.5",)),
    "missing-achievable-fraction": (_delete("hardware", "achievable", "memory"), "'hardware.achievable.memory'", ("missing",)),
    "missing-fp32-matmul": (_delete("hardware", "matmul_tflops", "fp32"), "'hardware.matmul_tflops.fp32'", ()),
    "missing-matmul-table": (_delete("hardware", "matmul_tflops"), "'hardware.matmul_tflops'", ("table",)),
    "unknown-codegen": (_set("codegen", to="cuda-graphs"), "'codegen'", ("triton", "tvm", "cuda-graphs")),
    "unknown-device": (_set("device", to="tpu"), "'device'", ("cuda", "cpu")),
    "calibrate-not-bool": (_set("calibrate", to="yes"), "'calibrate'", ()),
    "missing-name": (_delete("name"), "'name'", ()),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_file_names_the_field(tmp_path, case):
    edit, field, words = BAD_FILES[case]
    path = write_target(tmp_path, edit)
    with pytest.raises(UserInputError) as err:
        load_target(path)
    message = str(err.value)
    assert field in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_missing_hardware_is_fine_when_calibrated(tmp_path):
    def edit(data):
        del data["hardware"]
        data["calibrate"] = True

    target = load_target(write_target(tmp_path, edit))
    assert target.calibrate and target.hardware is None


def test_invalid_toml_is_a_user_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[hardware\nmemory_gb = 80\n')
    with pytest.raises(UserInputError) as err:
        load_target(path)
    message = str(err.value)
    assert str(path) in message and "not valid TOML" in message and "line 2" in message


def test_unknown_matmul_dtype_is_a_user_error_naming_the_dtype(tmp_path):
    path = write_target(tmp_path, _set("hardware", "matmul_tflops", "fp4", to=3958.0))
    with pytest.raises(UserInputError, match=r"unknown dtype 'fp4'.*fp32.*int8"):
        load_target(path)


def test_unknown_matmul_dtype_names_the_dotted_field(tmp_path):
    path = write_target(tmp_path, _set("hardware", "matmul_tflops", "fp4", to=3958.0))
    with pytest.raises(UserInputError, match=re.escape("'hardware.matmul_tflops.fp4'")):
        load_target(path)


def test_nan_fraction_is_rejected(tmp_path):
    path = write_target(tmp_path, _set("hardware", "achievable", "matmul", to=float("nan")))
    with pytest.raises(UserInputError, match=re.escape("'hardware.achievable.matmul'")):
        load_target(path)


def test_misspelt_optional_field_is_rejected(tmp_path):
    def edit(data):
        data["hardware"]["l2_mb"] = data["hardware"].pop("l2_mib")

    with pytest.raises(UserInputError, match="l2_mb"):
        load_target(write_target(tmp_path, edit))


def test_unknown_target_name_lists_the_known_targets():
    with pytest.raises(UserInputError) as err:
        load_target("nosuch")
    message = str(err.value)
    assert "'nosuch'" in message
    for name in known_targets():
        assert name in message


def test_missing_target_file_is_an_unknown_target(tmp_path):
    with pytest.raises(UserInputError, match="unknown target"):
        load_target(tmp_path / "absent.toml")


def test_target_equality_ignores_the_hardware_table():
    """`hardware` is compare=False: a target is identified by its name and settings."""
    h100 = load_target("h100")
    assert isinstance(h100, Target)
    assert h100 == Target(h100.name, h100.description, h100.device, h100.codegen, h100.tvm_target)
