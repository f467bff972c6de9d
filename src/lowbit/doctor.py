"""``lowbit doctor``: what this machine can do for low-bit inference, found out by trying.

:func:`diagnose` gathers facts (versions, CPU, CUDA devices) and runs small *actual* probes: can an
FP8 tensor be created on each device, does ``torch._scaled_mm`` run there and give the right answer
with per-tensor and with row-wise scales, does a CPU cast to ``float8_e4m3fn`` saturate or give NaN.
Every probe is guarded: a failure is recorded as its error string, never raised. The result is a
plain JSON-serializable dict; :func:`format_report` renders it as an aligned table for a terminal.

The ``"path"`` key says which FP8 matmul path lowbit can use here: ``"native"`` when a CUDA device
with compute capability >= 8.9 (Ada, Hopper, Blackwell) ran the ``_scaled_mm`` probe correctly,
``"emulated"`` otherwise; ``"path_reason"`` says why in one line.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

__all__ = ["diagnose", "format_report"]

_PACKAGES = ("transformers", "compressed-tensors", "accelerate", "safetensors", "triton")
_EXTRA_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn_x2")
_FP8_CAPABILITY = (8, 9)
_FP4_CAPABILITY = (10, 0)
_PROBE_SIZE = 16


def _err(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:  # PackageNotFoundError, or a broken installation
        return None


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    _, _, value = line.partition(":")
                    if value.strip():
                        return value.strip()
    except Exception:
        pass
    try:
        name = platform.processor()
        if name:
            return name
    except Exception:
        pass
    return None


def _num_cpus() -> dict[str, int | None]:
    logical: int | None = None
    usable: int | None = None
    try:
        logical = os.cpu_count()
    except Exception:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except Exception:
        usable = logical
    return {"logical": logical, "usable": usable}


def _driver_version(torch: Any) -> dict[str, str | None]:
    """NVIDIA driver version: pynvml if importable, else nvidia-smi if on PATH, else null."""
    errors = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass
        if isinstance(version, bytes):
            version = version.decode()
        if version:
            return {"version": str(version), "source": "pynvml"}
    except ImportError:
        pass
    except Exception as exc:
        errors.append(f"pynvml: {_err(exc)}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            if out.returncode == 0 and lines:
                return {"version": lines[0], "source": "nvidia-smi"}
            errors.append(f"nvidia-smi exited {out.returncode}")
        except Exception as exc:
            errors.append(f"nvidia-smi: {_err(exc)}")
    # torch exposes the CUDA *driver API* version (e.g. 12040), not the NVIDIA driver's own version
    try:
        api = int(torch._C._cuda_getDriverVersion())
        if api > 0:
            return {
                "version": None,
                "source": None,
                "cuda_driver_api": f"{api // 1000}.{(api % 1000) // 10}",
                "error": "; ".join(errors) or None,
            }
    except Exception:
        pass
    return {"version": None, "source": None, "error": "; ".join(errors) or None}


def _probe_fp8_tensor(torch: Any, device: str) -> dict[str, Any]:
    try:
        t = torch.zeros(_PROBE_SIZE, _PROBE_SIZE, device=device).to(torch.float8_e4m3fn)
        ok = t.dtype == torch.float8_e4m3fn and float(t.float().abs().sum().item()) == 0.0
        return {"ok": bool(ok), "error": None if ok else "zeros did not round-trip through float8_e4m3fn"}
    except Exception as exc:
        return {"ok": False, "error": _err(exc)}


def _probe_scaled_mm(torch: Any, device: str, rowwise: bool) -> dict[str, Any]:
    """Run ``torch._scaled_mm`` on a 16x16 problem and compare with a float32 reference.

    A is (M, K) row-major FP8 E4M3, B is (K, N) column-major (``b.t().contiguous().t()``), scales are
    float32: per-tensor scalars, or with ``rowwise`` scale_a (M, 1) and scale_b (1, N). The output is
    bfloat16, so the tolerance is a few bfloat16 ulps of the result's magnitude.
    """
    result: dict[str, Any] = {"ok": False, "error": None, "max_abs_err": None}
    try:
        if not hasattr(torch, "_scaled_mm"):
            result["error"] = "torch._scaled_mm does not exist in this torch"
            return result
        m = k = n = _PROBE_SIZE
        gen = torch.Generator().manual_seed(1234)
        a = torch.randn(m, k, generator=gen).clamp(-4, 4)
        b = torch.randn(k, n, generator=gen).clamp(-4, 4)
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn)
        if rowwise:
            sa = torch.linspace(0.5, 2.0, m, dtype=torch.float32).reshape(m, 1)
            sb = torch.linspace(0.25, 1.5, n, dtype=torch.float32).reshape(1, n)
        else:
            sa = torch.tensor(0.5, dtype=torch.float32)
            sb = torch.tensor(3.0, dtype=torch.float32)
        ref = (a8.float() * sa) @ (b8.float() * sb)
        a_dev = a8.to(device)
        b_dev = b8.to(device).t().contiguous().t()  # column-major (K, N)
        out = torch._scaled_mm(
            a_dev, b_dev, scale_a=sa.to(device), scale_b=sb.to(device), out_dtype=torch.bfloat16
        )
        if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
            out = out[0]
        got = out.float().cpu()
        if tuple(got.shape) != (m, n):
            result["error"] = f"wrong output shape {tuple(got.shape)}"
            return result
        err = float((got - ref).abs().max().item())
        result["max_abs_err"] = err if math.isfinite(err) else None
        tol = 2e-2 * float(ref.abs().max().item()) + 1e-3
        if math.isfinite(err) and err <= tol:
            result["ok"] = True
        else:
            result["error"] = f"wrong result: max abs error {err:.4g} > tolerance {tol:.4g}"
        return result
    except Exception as exc:
        result["error"] = _err(exc)
        return result


def _probe_cast_500(torch: Any) -> dict[str, Any]:
    """Does a CPU cast of 500.0 to float8_e4m3fn saturate (448) or give NaN? (torch 2.13: saturates.)"""
    try:
        value = float(torch.tensor([500.0]).to(torch.float8_e4m3fn).float().item())
    except Exception as exc:
        return {"observed": None, "behaviour": "error", "error": _err(exc)}
    if math.isnan(value):
        return {"observed": "nan", "behaviour": "nan", "error": None}
    if value == 448.0:
        behaviour = "saturates"
    elif math.isinf(value):
        behaviour = "inf"
    else:
        behaviour = "other"
    return {"observed": value if math.isfinite(value) else str(value), "behaviour": behaviour, "error": None}


def _capability_str(cap: tuple[int, int] | None) -> str | None:
    return None if cap is None else f"{cap[0]}.{cap[1]}"


def _cuda_devices(torch: Any, driver: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = []
    try:
        count = int(torch.cuda.device_count())
    except Exception as exc:
        return [{"index": None, "error": _err(exc)}]
    for i in range(count):
        dev: dict[str, Any] = {"index": i}
        cap: tuple[int, int] | None = None
        try:
            dev["name"] = str(torch.cuda.get_device_name(i))
        except Exception as exc:
            dev["name"] = None
            dev["name_error"] = _err(exc)
        try:
            major, minor = torch.cuda.get_device_capability(i)
            cap = (int(major), int(minor))
        except Exception as exc:
            dev["capability_error"] = _err(exc)
        dev["compute_capability"] = _capability_str(cap)
        try:
            props = torch.cuda.get_device_properties(i)
            dev["total_memory_gib"] = round(props.total_memory / 2**30, 2)
        except Exception as exc:
            dev["total_memory_gib"] = None
            dev["memory_error"] = _err(exc)
        dev["driver_version"] = driver.get("version")
        dev["fp8_tensor_cores"] = bool(cap is not None and cap >= _FP8_CAPABILITY)
        dev["fp4_tensor_cores"] = bool(cap is not None and cap >= _FP4_CAPABILITY)
        device = f"cuda:{i}"
        dev["probe_fp8_tensor"] = _probe_fp8_tensor(torch, device)
        dev["probe_scaled_mm_tensorwise"] = _probe_scaled_mm(torch, device, rowwise=False)
        dev["probe_scaled_mm_rowwise"] = _probe_scaled_mm(torch, device, rowwise=True)
        devices.append(dev)
    return devices


def _choose_path(d: dict[str, Any]) -> tuple[str, str]:
    if d.get("torch") is None:
        return "emulated", f"torch is not importable ({d.get('torch_error')}): nothing can run"
    devices = [x for x in d.get("cuda_devices") or [] if x.get("index") is not None]
    if not d.get("cuda_available") or not devices:
        return "emulated", "no CUDA device: FP8 is emulated on the CPU with exact E4M3 rounding"
    for dev in devices:
        if dev.get("fp8_tensor_cores") and (dev.get("probe_scaled_mm_tensorwise") or {}).get("ok"):
            return "native", (
                f"GPU {dev.get('name')} (cuda:{dev['index']}) has compute capability "
                f"{dev.get('compute_capability')} >= 8.9 and torch._scaled_mm ran FP8 E4M3 correctly"
            )
    capable = [dev for dev in devices if dev.get("fp8_tensor_cores")]
    if capable:
        dev = capable[0]
        why = (dev.get("probe_scaled_mm_tensorwise") or {}).get("error") or "unknown error"
        return "emulated", (
            f"GPU {dev.get('name')} has compute capability {dev.get('compute_capability')} >= 8.9 "
            f"but the torch._scaled_mm probe failed ({why}): emulated"
        )
    dev = devices[0]
    cc = dev.get("compute_capability") or "unknown"
    return "emulated", (
        f"GPU {dev.get('name')} has compute capability {cc} < 8.9: no FP8 tensor cores, emulated"
    )


def diagnose() -> dict:
    """Facts about this machine and what low-bit paths work on it. Never raises; JSON-serializable."""
    d: dict[str, Any] = {}
    try:
        from lowbit import __version__

        d["lowbit"] = __version__
    except Exception as exc:
        d["lowbit"] = None
        d["lowbit_error"] = _err(exc)
    d["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    d["python_executable"] = sys.executable
    try:
        d["platform"] = platform.platform()
    except Exception as exc:
        d["platform"] = _err(exc)
    d["cpu_name"] = _cpu_name()
    d["num_cpus"] = _num_cpus()

    torch: Any = None
    try:
        import torch as _torch

        torch = _torch
        d["torch"] = str(torch.__version__)
        d["torch_error"] = None
    except Exception as exc:
        d["torch"] = None
        d["torch_error"] = _err(exc)

    d["torch_cuda"] = None
    d["torch_hip"] = None
    d["cpu_capability"] = None
    d["torch_threads"] = None
    d["cuda_available"] = False
    d["driver"] = {"version": None, "source": None}
    d["cuda_devices"] = []
    d["dtypes"] = {name: False for name in _EXTRA_DTYPES}
    d["cpu_cast_500_to_e4m3"] = {"observed": None, "behaviour": "error", "error": "torch not importable"}
    d["cpu_probe_scaled_mm_tensorwise"] = {"ok": False, "error": "torch not importable", "max_abs_err": None}
    d["cpu_probe_scaled_mm_rowwise"] = {"ok": False, "error": "torch not importable", "max_abs_err": None}

    if torch is not None:
        try:
            d["torch_cuda"] = getattr(torch.version, "cuda", None)
            d["torch_hip"] = getattr(torch.version, "hip", None)
        except Exception:
            pass
        try:
            d["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        except Exception as exc:
            d["cpu_capability"] = None
            d["cpu_capability_error"] = _err(exc)
        try:
            d["torch_threads"] = int(torch.get_num_threads())
        except Exception:
            pass
        d["dtypes"] = {name: isinstance(getattr(torch, name, None), torch.dtype) for name in _EXTRA_DTYPES}
        d["cpu_cast_500_to_e4m3"] = _probe_cast_500(torch)
        d["cpu_probe_scaled_mm_tensorwise"] = _probe_scaled_mm(torch, "cpu", rowwise=False)
        d["cpu_probe_scaled_mm_rowwise"] = _probe_scaled_mm(torch, "cpu", rowwise=True)
        try:
            d["cuda_available"] = bool(torch.cuda.is_available())
        except Exception as exc:
            d["cuda_available"] = False
            d["cuda_error"] = _err(exc)
        if d["cuda_available"]:
            try:
                d["driver"] = _driver_version(torch)
            except Exception as exc:
                d["driver"] = {"version": None, "source": None, "error": _err(exc)}
            try:
                d["cuda_devices"] = _cuda_devices(torch, d["driver"])
            except Exception as exc:
                d["cuda_devices"] = [{"index": None, "error": _err(exc)}]

    d["packages"] = {name: _package_version(name) for name in _PACKAGES}
    try:
        d["path"], d["path_reason"] = _choose_path(d)
    except Exception as exc:
        d["path"], d["path_reason"] = "emulated", f"could not decide ({_err(exc)}): emulated"
    return d


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fmt_probe(p: Any) -> str:
    if not isinstance(p, dict):
        return _fmt(p)
    if p.get("ok"):
        err = p.get("max_abs_err")
        return "ok" if err is None else f"ok (max abs err {err:.3g})"
    return f"FAILED: {p.get('error') or 'unknown'}"


def format_report(d: dict) -> str:
    """Render :func:`diagnose`'s dict as an aligned two-column table, in sections."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []

    cpus = d.get("num_cpus") or {}
    if isinstance(cpus, dict):
        cpu_count = f"{_fmt(cpus.get('usable'))} usable / {_fmt(cpus.get('logical'))} logical"
    else:
        cpu_count = _fmt(cpus)
    sections.append(
        (
            "system",
            [
                ("lowbit", _fmt(d.get("lowbit"))),
                ("python", _fmt(d.get("python"))),
                ("platform", _fmt(d.get("platform"))),
                ("cpu", _fmt(d.get("cpu_name"))),
                ("cpu capability", _fmt(d.get("cpu_capability"))),
                ("cpus", cpu_count),
                ("torch threads", _fmt(d.get("torch_threads"))),
            ],
        )
    )

    torch_rows = [
        ("torch", _fmt(d.get("torch")) if d.get("torch") else f"not importable: {d.get('torch_error')}")
    ]
    torch_rows.append(("torch CUDA", _fmt(d.get("torch_cuda"))))
    if d.get("torch_hip"):
        torch_rows.append(("torch HIP", _fmt(d.get("torch_hip"))))
    for name, present in (d.get("dtypes") or {}).items():
        torch_rows.append((f"dtype {name}", "present" if present else "missing"))
    cast = d.get("cpu_cast_500_to_e4m3") or {}
    if cast.get("error"):
        cast_text = f"error: {cast.get('error')}"
    else:
        cast_text = f"{_fmt(cast.get('observed'))} ({_fmt(cast.get('behaviour'))})"
    torch_rows.append(("cpu cast 500 -> e4m3fn", cast_text))
    torch_rows.append(("cpu _scaled_mm tensor", _fmt_probe(d.get("cpu_probe_scaled_mm_tensorwise"))))
    torch_rows.append(("cpu _scaled_mm rowwise", _fmt_probe(d.get("cpu_probe_scaled_mm_rowwise"))))
    sections.append(("torch", torch_rows))

    cuda_rows = [("cuda available", _fmt(d.get("cuda_available")))]
    if d.get("cuda_error"):
        cuda_rows.append(("cuda error", _fmt(d.get("cuda_error"))))
    driver = d.get("driver") or {}
    if d.get("cuda_available"):
        drv = _fmt(driver.get("version"))
        if driver.get("source"):
            drv += f" (via {driver['source']})"
        elif driver.get("cuda_driver_api"):
            drv += f" (CUDA driver API {driver['cuda_driver_api']})"
        cuda_rows.append(("driver", drv))
    sections.append(("cuda", cuda_rows))

    for dev in d.get("cuda_devices") or []:
        idx = dev.get("index")
        if idx is None:
            sections.append(("cuda device ?", [("error", _fmt(dev.get("error")))]))
            continue
        rows = [
            ("name", _fmt(dev.get("name"))),
            ("compute capability", _fmt(dev.get("compute_capability"))),
            ("memory (GiB)", _fmt(dev.get("total_memory_gib"))),
            ("fp8 tensor cores", _fmt(dev.get("fp8_tensor_cores"))),
            ("fp4 tensor cores", _fmt(dev.get("fp4_tensor_cores"))),
            ("fp8 tensor", _fmt_probe(dev.get("probe_fp8_tensor"))),
            ("_scaled_mm tensor", _fmt_probe(dev.get("probe_scaled_mm_tensorwise"))),
            ("_scaled_mm rowwise", _fmt_probe(dev.get("probe_scaled_mm_rowwise"))),
        ]
        sections.append((f"cuda:{idx}", rows))

    sections.append(("packages", [(k, _fmt(v)) for k, v in (d.get("packages") or {}).items()]))
    sections.append(("result", [("path", _fmt(d.get("path"))), ("reason", _fmt(d.get("path_reason")))]))

    width = max((len(k) for _, rows in sections for k, _ in rows), default=0)
    lines: list[str] = []
    for title, rows in sections:
        if lines:
            lines.append("")
        lines.append(f"[{title}]")
        for key, value in rows:
            lines.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(lines)
