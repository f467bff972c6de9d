"""Streaming from disk (`lowbit.runtime`) on a tiny random Llama saved to disk: the checkpoint equals the
in-memory paths', an interrupted run (SIGKILL, a full disk, a dead rank) resumes to the same
checkpoint, a changed recipe starts over and says so, two gloo ranks write what one process writes,
and the plan is sane."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.algorithms.ptq import quantize_model
from lowbit.algorithms.sequential import SequentialOptions, quantize_sequential
from lowbit.checkpoint.export import save_checkpoint
from lowbit.checkpoint.io import load_tensors
from lowbit.checkpoint.load import load
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.runtime import quantize_streaming
from lowbit.runtime.plan import Machine, problems
from lowbit.runtime.resume import RunState, work_dir
from lowbit.scheme import Scheme, get_scheme
from tests.conftest import REPO, tiny_llama, word_tokenizer

SAMPLES = [torch.randint(3, 300, (24 + 4 * i,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
IDS = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(7))
W4 = get_scheme("w4a16", group_size=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 decoder layers, untied head (so the last unit writes lm_head)."""
    d = tmp_path_factory.mktemp("tiny-untied")
    tiny_llama(seed=3, num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def scheme_of(name: str) -> Scheme:
    if name == "fp8-moving":  # an order-dependent observer: streaming visits samples in the same order
        return get_scheme("fp8", observer="moving-minmax")
    return W4 if name == "w4a16" else get_scheme(name)


def reference(src: Path, out: Path, scheme: str, algorithm: str) -> Path:
    """The in-memory path: load, quantize_model (rtn) or quantize_sequential, save_checkpoint."""
    net, tok, _ = load_model(src)
    s = scheme_of(scheme)
    if algorithm == "rtn":
        rep = quantize_model(net, s, SAMPLES, progress=False)
    else:
        rep = quantize_sequential(net, s, SAMPLES, SequentialOptions(algorithm), progress=False)
    save_checkpoint(net, tok, out, scheme=s, ignore=rep.ignored, provenance={})
    return out


def stream(src: Path, out: Path, scheme: str = "fp8", algorithm: str = "rtn", **kw) -> dict:
    return quantize_streaming(src, out, scheme_of(scheme), SAMPLES, algorithm=algorithm, progress=False, **kw)


def differing(a: Path, b: Path) -> list[str]:
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
    return [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]


def qconfig(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize(("scheme", "tied"), [("fp8", False), ("fp8-dynamic", False), ("fp8", True), ("fp8-moving", False)])
def test_round_to_nearest_equals_the_in_memory_path(model_dir: Path, tiny_model_dir: Path, tmp_path: Path,
                                                    scheme: str, tied: bool) -> None:
    src = tiny_model_dir if tied else model_dir
    ref = reference(src, tmp_path / "ref", scheme, "rtn")
    prov = stream(src, tmp_path / "out", scheme)
    assert differing(tmp_path / "out", ref) == []  # bit for bit: codes, scales, embeddings, norms, head
    assert qconfig(tmp_path / "out") == qconfig(ref)
    assert prov["streaming"]["shards"] == (4 if tied else 5)  # embeddings, each layer, the head (none if tied)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    assert not work_dir(tmp_path / "out").exists()
    with torch.inference_mode():
        assert torch.equal(load(tmp_path / "out")(input_ids=IDS).logits, load(ref)(input_ids=IDS).logits)


@pytest.mark.parametrize("scheme", ["fp8", "w4a16"])
def test_gptq_equals_layer_by_layer_in_memory(model_dir: Path, tmp_path: Path, scheme: str) -> None:
    # one process runs the very code of quantize_sequential on the same inputs in the same order:
    # identical here, though only "within float tolerance" is promised across torch builds
    ref = reference(model_dir, tmp_path / "ref", scheme, "gptq")
    prov = stream(model_dir, tmp_path / "out", scheme, "gptq")
    assert differing(tmp_path / "out", ref) == []
    assert prov["algorithm"] == "gptq" and prov["algorithm_report"]["layers"]


def test_activations_on_disk_give_the_same_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    stream(model_dir, tmp_path / "mem", "fp8", "gptq")
    prov = stream(model_dir, tmp_path / "disk", "fp8", "gptq", activations_on_disk=True)
    assert prov["streaming"]["activations_on_disk"] and differing(tmp_path / "disk", tmp_path / "mem") == []


RUN = """
import sys, json, torch
sys.path.insert(0, {repo!r})
from lowbit.runtime import quantize_streaming
from tests.test_streaming import SAMPLES, scheme_of
prov = quantize_streaming({src!r}, {out!r}, scheme_of({scheme!r}), SAMPLES, algorithm={algo!r}, progress=False)
print(json.dumps(prov["streaming"]))
"""


def run_subprocess(src: Path, out: Path, scheme: str, algo: str, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    code = RUN.format(repo=str(REPO), src=str(src), out=str(out), scheme=scheme, algo=algo)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_sigkill_halfway_then_rerun_gives_the_uninterrupted_checkpoint(model_dir: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    # killed (SIGKILL, no cleanup of any kind) once unit 2 (the second decoder layer) is committed
    p = run_subprocess(model_dir, out, "fp8", "gptq", {"LOWBIT_TEST_KILL_AFTER_UNIT": "2"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not out.exists()  # never presented as complete
    state = RunState.load(work_dir(out))
    assert state is not None and state.done == 3 and state.units == 5
    with caplog.at_level(logging.INFO, logger="lowbit"):
        prov = stream(model_dir, out, "fp8", "gptq")  # the same command
    assert "resuming" in caplog.text and prov["streaming"]["resumed_after_units"] == 3
    stream(model_dir, tmp_path / "whole", "fp8", "gptq")
    assert differing(out, tmp_path / "whole") == []
    assert not work_dir(out).exists()


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(*args, **kw):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_full_disk_leaves_a_resumable_partial_run(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _full_disk_at(m, 3)  # the third shard: decoder layer 1
        with pytest.raises(LowbitError, match="no space left.*rerun the same command to resume") as e:
            stream(model_dir, out, "fp8")
    assert e.value.exit_code == 2
    assert not out.exists()
    state = RunState.load(work_dir(out))
    assert state is not None and state.done == 2
    assert not list((work_dir(out) / "out").glob("*.tmp"))  # no half-written shard is left behind
    prov = stream(model_dir, out, "fp8")
    assert prov["streaming"]["resumed_after_units"] == 2
    stream(model_dir, tmp_path / "whole", "fp8")
    assert differing(out, tmp_path / "whole") == []


def test_a_changed_recipe_starts_over_and_says_why(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _full_disk_at(m, 3)
        with pytest.raises(LowbitError):
            stream(model_dir, out, "fp8")
    with caplog.at_level(logging.INFO, logger="lowbit"):
        prov = stream(model_dir, out, "fp8-dynamic")
    assert "starting over" in caplog.text and "the recipe" in caplog.text
    assert prov["streaming"]["resumed_after_units"] == 0
    stream(model_dir, tmp_path / "direct", "fp8-dynamic")
    assert differing(out, tmp_path / "direct") == []


def test_two_gloo_ranks_write_what_one_process_writes(model_dir: Path, tmp_path: Path) -> None:
    # min-max statistics reduce exactly (MAX/MIN), round-to-nearest solves are deterministic: bit for bit
    one = stream(model_dir, tmp_path / "one", "fp8")
    two = stream(model_dir, tmp_path / "two", "fp8", ranks=2)
    assert two["streaming"]["ranks"] == 2
    assert differing(tmp_path / "two", tmp_path / "one") == []
    assert two["algorithm_report"]["tokens_seen_min"] == one["algorithm_report"]["tokens_seen_min"] == sum(
        len(s) for s in SAMPLES)


def test_two_gloo_ranks_gptq_within_tolerance(model_dir: Path, tmp_path: Path) -> None:
    # The ranks add their unnormalized X^T X and scale by 2 / n once; one process keeps a running mean
    # (`hessian_update`). Same Hessian in exact arithmetic, float32 rounding in another order (~1e-7
    # relative): GPTQ may then round a weight sitting on a grid midpoint the other way. Promised:
    # scales identical (they come from the weights alone here), at most 0.1% of the codes differ, each
    # by one grid step. (On this model none differs.)
    stream(model_dir, tmp_path / "one", "w4a16", "gptq")
    stream(model_dir, tmp_path / "two", "w4a16", "gptq", ranks=2)
    a, b = load_tensors(tmp_path / "two"), load_tensors(tmp_path / "one")
    from lowbit.formats.packing import unpack_int32_to_intn

    for k in a:
        if k.endswith("weight_packed"):
            cols = int(a[k.replace("packed", "shape")][1])
            ca, cb = unpack_int32_to_intn(a[k], cols, 4).int(), unpack_int32_to_intn(b[k], cols, 4).int()
            assert (ca != cb).float().mean() <= 1e-3 and (ca - cb).abs().max() <= 1, k
        else:
            assert torch.equal(a[k], b[k]), k


def test_mixture_of_experts_streams_per_expert_on_one_or_two_ranks(tmp_path: Path) -> None:
    # Qwen3-MoE as transformers 5 saves it (one tensor per expert): each layer's fused experts become
    # per-expert Linears before its tensors are read; expert token counts are summed over the ranks
    from tests.test_experts import qwen3_moe

    src = tmp_path / "moe"
    qwen3_moe(dtype=torch.bfloat16).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    ref = reference(src, tmp_path / "ref", "fp8", "rtn")
    one = stream(src, tmp_path / "one", "fp8")
    two = stream(src, tmp_path / "two", "fp8", ranks=2)
    assert differing(tmp_path / "one", ref) == [] and differing(tmp_path / "two", ref) == []
    assert one["tokens_per_expert"] == two["tokens_per_expert"] and len(one["tokens_per_expert"]) == 2
    assert sum(one["tokens_per_expert"]["model.layers.0.mlp.experts"]) == 2 * sum(len(s) for s in SAMPLES)  # top 2


def test_a_dead_rank_stops_the_others_and_the_run_resumes(model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("LOWBIT_TEST_KILL_AFTER_UNIT", "2:1")  # rank 1 is SIGKILLed after unit 2
    with pytest.raises(LowbitError, match=r"rank 1 of 2 died \(signal SIGKILL\).*rerun the same command"):
        stream(model_dir, out, "fp8", ranks=2)
    monkeypatch.delenv("LOWBIT_TEST_KILL_AFTER_UNIT")
    assert not out.exists()
    # resumed later on one process (the saved inputs are per sample, not per rank)
    prov = stream(model_dir, out, "fp8")
    assert prov["streaming"]["resumed_after_units"] == 3
    stream(model_dir, tmp_path / "whole", "fp8")
    assert differing(out, tmp_path / "whole") == []


def test_plan_only_does_no_work_and_its_numbers_are_sane(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = stream(model_dir, out, "fp8", plan_only=True)["plan"]
    assert not out.exists() and not work_dir(out).exists() and list(tmp_path.iterdir()) == []
    disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert 0.95 * disk < plan["model_bytes"] <= disk  # the tensors, without the headers
    assert plan["seconds_first_layer"] > 0 and plan["estimated_seconds"] > 0 and plan["fits"]
    assert plan["tokens"] == sum(len(s) for s in SAMPLES)
    # against a real run in a fresh process: its checkpoint and its peak resident memory
    p = run_subprocess(model_dir, out, "fp8", "rtn")
    assert p.returncode == 0, p.stderr[-2000:]
    measured = json.loads(p.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.9 * size < plan["output_bytes"] < 1.1 * size
    # the estimate starts from the planning process's own resident size (measured), so on a tiny model
    # it is mostly that baseline; bench/streaming_memory.py checks the working-set part on 6 GB
    ratio = measured["plan"]["host_peak_bytes"] / measured["peak_host_bytes_rank0"]
    assert 0.5 < ratio < 2, ratio


def test_a_plan_that_does_not_fit_is_refused_up_front(model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    plan = stream(model_dir, tmp_path / "p", "fp8", plan_only=True)["plan"]
    from lowbit.runtime.plan import Plan

    small = Machine(host_available=plan["host_peak_bytes"] // 2, gpu_free=None, disk_free=10**12)
    msgs = problems(Plan(**plan), small)
    assert len(msgs) == 1 and msgs[0].startswith("host memory") and "--activations-on-disk" in msgs[0]
    assert problems(Plan(**plan), Machine(10**12, None, plan["disk_bytes"] // 3))[0].startswith("disk")
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls, output, device: small))
    with pytest.raises(LowbitError, match="does not fit this machine: host memory.*--num-samples"):
        stream(model_dir, tmp_path / "out", "fp8")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_more_gpus_than_present_and_an_existing_output_are_one_clear_error(model_dir: Path, tmp_path: Path) -> None:
    from lowbit.runtime.distributed import available_gpus

    n = available_gpus() + 1
    with pytest.raises(LowbitError, match=f"--gpus {n}: this machine has {n - 1} CUDA GPU") as e:
        stream(model_dir, tmp_path / "out", "fp8", gpus=n)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        stream(model_dir, tmp_path / "exists", "fp8")


def test_cli_stream_plan_and_bad_flags(tmp_path: Path, model_dir: Path, calib_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.checkpoint.check import check_directory
    from lowbit.cli import main

    src = model_dir
    args = ["--scheme", "fp8", "--calib", str(calib_file), "--num-samples", "4", "--max-length", "32",
            "--min-length", "4", "--quiet"]
    assert main(["quantize", str(src), "--stream", "--plan", *args, "-o", str(tmp_path / "o")]) == 0
    assert "host memory" in capsys.readouterr().out and not (tmp_path / "o").exists()  # a plan writes nothing
    assert main(["quantize", str(src), "--stream", *args, "-o", str(tmp_path / "o")]) == 0
    assert "streamed layer by layer" in capsys.readouterr().out
    assert check_directory(tmp_path / "o").ok
    for bad, needle in ((["--plan"], "add --stream"), (["--stream", "--gpus", "64"], "GPU"),
                        (["--stream", "--keep-fraction", "0.05"], "cannot run with --stream")):
        assert main(["quantize", str(src), *bad, *args, "-o", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err
        assert err.count("lowbit: error:") == 1 and needle in err, err


def test_gpu_plan_keeps_the_host_for_the_largest_unit_and_cuda_libraries() -> None:
    """On a GPU the host holds the process, one unit as read from disk and CUDA's libraries (loaded after
    planning: the 8B GPU run peaked 0.93 GiB above a plan without them); the GPU holds the working set.
    Pure arithmetic on the inputs: exact equality."""
    from lowbit.runtime.plan import CUDA_CONTEXT, CUDA_HOST_LIBRARIES, UnitSize, estimate

    def unit(name: str, stored: int) -> UnitSize:
        return UnitSize(name, stored, stored // 4, stored // 2, 0, 64)

    sizes = [unit("embed", 1000), unit("layer.0", 5000), unit("layer.1", 4000), unit("head", 3000)]
    kw = dict(sample_tokens=[10, 20], hidden=8, head_dim=4, act_bytes=2, world=1, activations_on_disk=False,
              algorithm="rtn", calibrates=False, static_cache=False, process_bytes=100)
    gpu = estimate(sizes, device="cuda", **kw)
    cpu = estimate(sizes, device="cpu", **kw)
    assert gpu.host_per_rank_bytes == 100 + CUDA_HOST_LIBRARIES + 5000
    assert gpu.gpu_peak_bytes is not None and gpu.gpu_peak_bytes > CUDA_CONTEXT + 5000
    assert cpu.gpu_peak_bytes is None and cpu.host_per_rank_bytes == 100 + gpu.gpu_peak_bytes - CUDA_CONTEXT
