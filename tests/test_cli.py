"""The CLI contract: bad input gets one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli import main

TINY_ARGS = ["--num-samples", "4", "--max-length", "32", "--min-length", "4", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("lowbit: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_quantize_and_eval_round_trip(tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code, stdout, _ = run_cli(capsys, "quantize", str(tiny_model_dir), "--scheme", "fp8", "--calib", str(calib_file),
                              *TINY_ARGS, "--output", str(out))
    assert code == 0 and "Linear layers" in stdout and (out / "config.json").exists()
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 300}" for i in range(400)))
    code, stdout, _ = run_cli(capsys, "eval", str(out), "--data", str(text), "--windows", "3", "--seq-len", "64",
                              "--decode-tokens", "4", "--quiet", "--json", str(tmp_path / "r.json"))
    assert code == 0 and "perplexity" in stdout and "top-1 agreement" in stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["accuracy"]["tokens"] == 3 * 63 and r["base"] == str(tiny_model_dir)
    assert 0 <= r["accuracy"]["kl_mean"] < 0.1 and r["size"]["quantized_disk_bytes"] < r["size"]["base_disk_bytes"]
    assert r["latency"]["quantized"]["decode"]["n"] == 4


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["quantize", "/no/such/model", "--output", "{tmp}/o"], "no model '/no/such/model'"),
        (["quantize", "{model}", "--scheme", "int3", "--output", "{tmp}/o"], "unknown scheme 'int3'"),
        (["quantize", "{model}", "--calib", "{tmp}/empty.txt", "--output", "{tmp}/o"], "empty"),
        (["quantize", "{model}", "--calib", "{tmp}/short.txt", "--output", "{tmp}/o"], "too short"),
        (["quantize", "{model}", "--calib", "{tmp}/missing.txt", "--output", "{tmp}/o"], "missing.txt"),
        (["quantize", "{model}", "--output", "{tmp}/exists"], "already exists"),
        (["quantize", "{tmp}/notlm", "--output", "{tmp}/o"], "not a causal language model"),
        (["quantize", "{model}", "--ignore", "nothing_like_this", "--scheme", "fp8-dynamic", "--output", "{tmp}/o"],
         "matched no Linear layer"),
        (["quantize", "{model}", "--observer", "magic", "--output", "{tmp}/o"], "unknown observer"),
        (["eval", "{tmp}/exists", "--base", "{model}"], "no config.json"),
        (["eval", "{tmp}/foreign", "--base", "{model}"], "quantization method 'awq'"),
        (["eval", "{tmp}/corrupt", "--base", "{model}"], "cannot read"),
        (["eval", "{model}"], "does not record its base model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, tmp_path: Path, tiny_model_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("w1 w2\n\nw3\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "notlm").mkdir()
    (tmp_path / "notlm" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    for name, qc in (("foreign", {"quant_method": "awq", "bits": 4}), ("corrupt", None)):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
        if qc:
            cfg["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").write_bytes(b"\x00garbage")
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in argv]
    if args[0] == "quantize" and "--calib" not in args:
        args += ["--calib", str(tmp_path / "short.txt")]
    code, _, err = run_cli(capsys, *args, "--quiet")
    assert code == 2
    one_line_error(err, needle)
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError):
        main(["quantize", "/no/such/model", "--output", str(tmp_path / "o"), "--debug"])


def test_console_script_and_doctor() -> None:
    exe = Path(sys.executable).with_name("lowbit")
    proc = subprocess.run([str(exe), "doctor"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "emulated" in proc.stdout or "native" in proc.stdout
