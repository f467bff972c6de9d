"""Tests for lowbit.doctor: facts are gathered, every probe is guarded, the path decision is right."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from lowbit import __version__
from lowbit.doctor import _choose_path, diagnose, format_report

EXPECTED_KEYS = {
    "lowbit",
    "python",
    "platform",
    "torch",
    "torch_cuda",
    "cpu_name",
    "cpu_capability",
    "num_cpus",
    "cuda_available",
    "driver",
    "cuda_devices",
    "dtypes",
    "cpu_cast_500_to_e4m3",
    "cpu_probe_scaled_mm_tensorwise",
    "cpu_probe_scaled_mm_rowwise",
    "packages",
    "path",
    "path_reason",
}

DEVICE_KEYS = {
    "index",
    "name",
    "compute_capability",
    "total_memory_gib",
    "driver_version",
    "fp8_tensor_cores",
    "fp4_tensor_cores",
    "probe_fp8_tensor",
    "probe_scaled_mm_tensorwise",
    "probe_scaled_mm_rowwise",
}


@pytest.fixture(scope="module")
def report() -> dict:
    return diagnose()


def test_diagnose_has_keys(report):
    assert EXPECTED_KEYS <= set(report)
    assert report["lowbit"] == __version__
    assert report["torch"] == torch.__version__
    assert set(report["dtypes"]) == {"float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn_x2"}
    assert set(report["packages"]) == {
        "transformers",
        "compressed-tensors",
        "accelerate",
        "safetensors",
        "triton",
    }
    assert report["path"] in ("native", "emulated")
    assert isinstance(report["path_reason"], str) and report["path_reason"]
    for dev in report["cuda_devices"]:
        assert DEVICE_KEYS <= set(dev)


def test_diagnose_is_strict_json(report):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report


def test_cpu_facts(report):
    assert report["dtypes"]["float8_e4m3fn"] is True
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cast = report["cpu_cast_500_to_e4m3"]
    observed = torch.tensor([500.0]).to(torch.float8_e4m3fn).float().item()
    if observed != observed:  # NaN
        assert cast["behaviour"] == "nan" and cast["observed"] == "nan"
    else:
        assert cast["observed"] == observed
        assert cast["behaviour"] == ("saturates" if observed == 448.0 else cast["behaviour"])
    for key in ("cpu_probe_scaled_mm_tensorwise", "cpu_probe_scaled_mm_rowwise"):
        probe = report[key]
        assert set(probe) >= {"ok", "error", "max_abs_err"}
        assert probe["ok"] or probe["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA decision")
def test_emulated_without_cuda(report):
    assert report["cuda_available"] is False
    assert report["cuda_devices"] == []
    assert report["path"] == "emulated"
    assert "no CUDA device" in report["path_reason"]


def test_format_report_contains_torch_and_path(report):
    text = format_report(report)
    assert torch.__version__ in text
    assert report["path"] in text
    assert report["path_reason"] in text
    rows = [re.match(r"^  (\S.*?)\s{2,}(\S.*)$", ln) for ln in text.splitlines() if ln.startswith("  ")]
    assert rows and all(rows)
    # aligned: every value column starts at the same offset
    assert len({m.start(2) for m in rows}) == 1


def test_format_report_tolerates_sparse_dict():
    assert "emulated" in format_report({"path": "emulated"})
    assert format_report({})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 3 s budget is for CPU-only machines")
def test_fast_on_cpu():
    start = time.perf_counter()
    diagnose()
    assert time.perf_counter() - start < 3.0


def test_probe_failures_are_recorded_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated _scaled_mm failure")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    d = diagnose()
    assert d["cpu_probe_scaled_mm_tensorwise"]["ok"] is False
    assert "simulated _scaled_mm failure" in d["cpu_probe_scaled_mm_tensorwise"]["error"]
    assert "simulated" in d["cpu_probe_scaled_mm_rowwise"]["error"]
    json.dumps(d, allow_nan=False)
    if torch.cuda.is_available():
        assert d["path"] == "emulated"


def test_missing_scaled_mm_is_recorded(monkeypatch):
    monkeypatch.delattr(torch, "_scaled_mm")
    d = diagnose()
    assert d["cpu_probe_scaled_mm_tensorwise"]["ok"] is False
    assert "does not exist" in d["cpu_probe_scaled_mm_tensorwise"]["error"]


def _fake(cap: str, fp8: bool, ok: bool, name: str = "NVIDIA X") -> dict:
    return {
        "torch": "2.13.0",
        "cuda_available": True,
        "cuda_devices": [
            {
                "index": 0,
                "name": name,
                "compute_capability": cap,
                "total_memory_gib": 80.0,
                "driver_version": "570.1",
                "fp8_tensor_cores": fp8,
                "fp4_tensor_cores": False,
                "probe_fp8_tensor": {"ok": True, "error": None},
                "probe_scaled_mm_tensorwise": {
                    "ok": ok,
                    "error": None if ok else "boom",
                    "max_abs_err": 0.01,
                },
                "probe_scaled_mm_rowwise": {"ok": ok, "error": None if ok else "boom", "max_abs_err": 0.01},
            }
        ],
    }


def test_choose_path_rules():
    path, reason = _choose_path(_fake("8.0", fp8=False, ok=True, name="NVIDIA A100"))
    assert path == "emulated"
    assert "NVIDIA A100" in reason and "8.0 < 8.9" in reason

    path, reason = _choose_path(_fake("9.0", fp8=True, ok=True, name="NVIDIA H100"))
    assert path == "native" and "9.0" in reason

    path, reason = _choose_path(_fake("9.0", fp8=True, ok=False))
    assert path == "emulated" and "boom" in reason

    path, reason = _choose_path({"torch": "2.13.0", "cuda_available": False, "cuda_devices": []})
    assert path == "emulated" and "no CUDA device" in reason

    path, _ = _choose_path({"torch": None, "torch_error": "ImportError"})
    assert path == "emulated"


def test_format_report_renders_gpu_section():
    d = _fake("9.0", fp8=True, ok=True, name="NVIDIA H100")
    d["path"], d["path_reason"] = _choose_path(d)
    text = format_report(d)
    assert "[cuda:0]" in text and "NVIDIA H100" in text and "native" in text


# ---------------------------------------------------------------- GPU only


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
def test_gpu_devices_reported(report):
    assert report["cuda_available"] is True
    assert len(report["cuda_devices"]) == torch.cuda.device_count()
    for dev in report["cuda_devices"]:
        major, minor = torch.cuda.get_device_capability(dev["index"])
        assert dev["compute_capability"] == f"{major}.{minor}"
        assert dev["fp8_tensor_cores"] == ((major, minor) >= (8, 9))
        assert dev["fp4_tensor_cores"] == ((major, minor) >= (10, 0))
        assert dev["total_memory_gib"] > 0
        assert dev["probe_fp8_tensor"]["ok"], dev["probe_fp8_tensor"]["error"]


@needs_cuda
@pytest.mark.gpu
def test_gpu_fp8_probes_pass_on_capable_devices(report):
    capable = [d for d in report["cuda_devices"] if d["fp8_tensor_cores"]]
    if not capable:
        pytest.skip("no CUDA device with compute capability >= 8.9")
    for dev in capable:
        assert dev["probe_scaled_mm_tensorwise"]["ok"], dev["probe_scaled_mm_tensorwise"]["error"]
        major, _ = torch.cuda.get_device_capability(dev["index"])
        if major >= 9:  # row-wise scaling is guaranteed on Hopper and newer
            assert dev["probe_scaled_mm_rowwise"]["ok"], dev["probe_scaled_mm_rowwise"]["error"]
    assert report["path"] == "native"


@needs_cuda
@pytest.mark.gpu
def test_gpu_path_emulated_below_89(report):
    if any(d["fp8_tensor_cores"] for d in report["cuda_devices"]):
        pytest.skip("a device has FP8 tensor cores")
    assert report["path"] == "emulated"
    assert "< 8.9" in report["path_reason"]
