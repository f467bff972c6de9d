"""Mixture-of-Experts (fused 3-D experts as per-expert Linears) and the integrity gate.

The architecture matrix (every MoE family, saved and reloaded through lowbit and transformers) is
tests/test_architectures.py; here: the mechanics on a tiny Qwen3-MoE and a dense (Llama-4 style)
experts module, calibration per expert, vLLM's MoE scale rules, and planted defects the gate stops.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.algorithms.ptq import quantize_model
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.nn.experts import LinearExperts, expert_modules, linearize_experts, three_d_modules
from lowbit.scheme import get_scheme
from tests.conftest import word_tokenizer

TINY_ARGS = ["--num-samples", "4", "--max-length", "32", "--min-length", "4", "--quiet"]


def qwen3_moe(experts: int = 8, top_k: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Built in `dtype` (not cast afterwards: .to(bf16) would also round the rotary frequencies,
    which a reloaded model computes in float32)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=128)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 3 or p.abs().sum() == 0:  # transformers leaves experts and routers for init: fill them
                p.normal_(0, 0.05)
    return m


def test_linearized_experts_compute_what_the_fused_ones_do() -> None:
    # same weights, per-expert Linear instead of indexing a 3-D tensor; float32, so only the order
    # of a few float32 sums may differ (observed <= 2e-7 on logits ~0.5): tolerance 1e-5
    m = qwen3_moe()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    done = linearize_experts(m)
    assert done == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and not three_d_modules(m)
    names = {n for n, _ in m.named_parameters()}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # vLLM's per-expert layout
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_dense_experts_llama4_style() -> None:
    # Llama-4 keeps its experts transposed, (E, H, 2I) and (E, I, H), and runs every expert on its
    # slice of an (E * T, H) input: no flags, found from the shapes and the forward's signature
    class DenseExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 2 * 8) * 0.1)
            self.down_proj = nn.Parameter(torch.randn(3, 8, 16) * 0.1)
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            x = hidden_states.view(3, -1, 16)
            gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, 16)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"hidden_size": 16})()
            self.experts = DenseExperts()

    m = Model()
    x = torch.randn(3 * 5, 16)
    ref = m.experts(x)
    linearize_experts(m)
    assert isinstance(m.experts, LinearExperts) and not m.experts.layout.routed and m.experts.layout.transposed
    torch.testing.assert_close(m.experts(x), ref, atol=1e-6, rtol=0)


def test_three_d_weights_lowbit_cannot_read_are_named_not_skipped() -> None:
    m = qwen3_moe()
    m.model.layers[0].mlp.mystery = nn.Module()
    m.model.layers[0].mlp.mystery.table = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.mystery .*cannot interpret.*--ignore"):
        quantize_model(m, get_scheme("fp8-dynamic"), None, progress=False)
    m = qwen3_moe()
    m.model.layers[0].mlp.mystery = nn.Module()
    m.model.layers[0].mlp.mystery.table = nn.Parameter(torch.zeros(2, 3, 4))
    rep = quantize_model(m, get_scheme("fp8-dynamic"), None, ignore=["mystery"], progress=False)
    assert "model.layers.0.mlp.mystery" in rep.ignored  # kept, and said so


def test_static_experts_follow_vllm_moe_rules() -> None:
    m = qwen3_moe(dtype=torch.bfloat16)
    samples = [torch.randint(0, 320, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    rep = quantize_model(m, get_scheme("fp8"), samples, progress=False)
    assert "model.layers.0.mlp.gate" in rep.ignored and "model.layers.1.mlp.gate" in rep.ignored  # routers
    for _, le in expert_modules(m):
        projs = [(e.gate_proj, e.up_proj, e.down_proj) for e in le.experts()]
        assert all(isinstance(p, QuantLinear) for ps in projs for p in ps)
        # static inputs with per-channel weights are not a vLLM FP8 MoE scheme: experts go per tensor
        assert all(p.weight_args.strategy == "tensor" for ps in projs for p in ps)
        # one input scale per layer for all gate/up and one for all down projections (vLLM keeps the max)
        assert len({float(p.input_scale) for g, u, _ in projs for p in (g, u)}) == 1
        assert len({float(d.input_scale) for _, _, d in projs}) == 1
        # gate and up of one expert share a weight scale (vLLM requantizes w13 to the larger)
        assert all(float(g.weight_scale) == float(u.weight_scale) for g, u, _ in projs)
    assert m.model.layers[0].self_attn.q_proj.weight_args.strategy == "channel"  # the rest keeps the scheme
    counts = rep.tokens_per_expert["model.layers.0.mlp.experts"]
    assert sum(counts) == 4 * 32 * 2  # every token reaches top_k = 2 experts


def test_experts_without_tokens_take_the_layer_max_and_are_named(caplog: pytest.LogCaptureFixture) -> None:
    # 8 experts, top-1, 3 tokens: at least 5 experts per layer see nothing
    m = qwen3_moe(top_k=1, dtype=torch.bfloat16)
    rep = quantize_model(m, get_scheme("fp8"), [torch.tensor([5, 17, 99])], progress=False)
    assert len(rep.experts_without_tokens) >= 2 * 5 * 3
    assert "saw no calibration token" in caplog.text
    le = m.model.layers[0].mlp.experts
    seen = [e for e, c in enumerate(rep.tokens_per_expert["model.layers.0.mlp.experts"]) if c]
    unseen = [e for e in range(8) if e not in seen]
    top = max(float(le.get_submodule(f"{e}.gate_proj").input_scale) for e in seen)
    assert all(float(le.get_submodule(f"{e}.gate_proj").input_scale) == top for e in unseen)


def test_calibrating_all_experts_sees_every_token_and_changes_no_output() -> None:
    m = qwen3_moe(top_k=1, dtype=torch.bfloat16)
    le = m.model.layers[0].mlp.experts
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        le.calibrate_all = True
        got = m(input_ids=ids).logits
        le.calibrate_all = False
    assert torch.equal(got, ref)  # the extra passes are observed only: bit for bit the same output
    a = copy.deepcopy(m)
    rep = quantize_model(a, get_scheme("fp8"), [ids[0]], progress=False, calibrate_all_experts=True)
    assert rep.experts_without_tokens == []
    assert all(e.gate_proj.input_tokens == 12 for e in a.model.layers[1].mlp.experts.experts())


# ---- the integrity gate, through the CLI: planted defects give exit 2, one line each, nothing written


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-moe")
    qwen3_moe(dtype=torch.bfloat16).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def test_moe_quantize_reports_experts_and_passes_the_gate(tmp_path: Path, moe_dir: Path, calib_file: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code = main(["quantize", str(moe_dir), "--scheme", "fp8", "--calib", str(calib_file), *TINY_ARGS,
                 "--output", str(out), "--calibrate-all-experts"])
    stdout = capsys.readouterr().out
    assert code == 0 and "integrity" in stdout and "passed" in stdout and "experts: " in stdout
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    assert prov["integrity"]["passed"] and prov["calibrate_all_experts"]
    cov = prov["integrity"]["coverage"]["experts"]
    assert cov["quantized_params"] == cov["targeted_params"] == 2 * 8 * 3 * 64 * 32  # 100% of the expert weights
    assert set(prov["tokens_per_expert"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def _plant(monkeypatch: pytest.MonkeyPatch, defect: str) -> None:
    """Break the quantized model (or what is written) the way a bug would, after quantization."""
    import lowbit.api as api

    real = api.quantize_model

    def broken(net: nn.Module, *args: object, **kwargs: object) -> object:
        report = real(net, *args, **kwargs)  # type: ignore[arg-type]
        q = net.get_submodule("model.layers.0.mlp.down_proj")
        if defect == "zero scale":
            q.weight_scale.zero_()
        elif defect == "constant weight":
            q.weight.zero_()
        elif defect == "not quantized":  # a targeted layer silently left in bf16
            lin = nn.Linear(q.in_features, q.out_features, bias=False, dtype=torch.bfloat16)
            net.model.layers[0].mlp.down_proj = lin
        elif defect == "no token":
            q.input_tokens = 0
        return report

    monkeypatch.setattr(api, "quantize_model", broken)
    if defect == "no tokenizer":
        monkeypatch.setattr(type(word_tokenizer()), "save_pretrained", lambda self, *a, **k: None)


@pytest.mark.parametrize(("defect", "message"), [
    ("zero scale", "scale"),
    ("constant weight", "constant"),
    ("not quantized", "coverage: mlp"),
    ("no token", "saw no calibration token"),
    ("no tokenizer", "no tokenizer in"),
])
def test_the_gate_stops_planted_defects(defect: str, message: str, tmp_path: Path, tiny_model_dir: Path,
                                        calib_file: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(monkeypatch, defect)
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "fp8", "--calib", str(calib_file), *TINY_ARGS,
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "integrity gate failed" in err, err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())  # no temp left either
    code = main(["quantize", str(tiny_model_dir), "--scheme", "fp8", "--calib", str(calib_file), *TINY_ARGS,
                 "--output", str(out), "--allow-partial"])
    stdout = capsys.readouterr().out
    prov = json.loads((out / "lowbit_provenance.json").read_text())
    assert code == 0 and "FAILED" in stdout and not prov["integrity"]["passed"]
    assert any(message in f for f in prov["integrity"]["failures"])


def test_the_gate_refuses_a_weight_with_nan(tmp_path: Path, calib_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import tiny_llama

    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    src = tmp_path / "nan-model"
    m.save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    code = main(["quantize", str(src), "--scheme", "fp8", "--calib", str(calib_file), *TINY_ARGS,
                 "--output", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or Inf in the weight of model.layers.1.self_attn.o_proj" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(("scheme", "group"), [("w8a8-int8", None), ("w4a16", 32)])
def test_experts_in_the_integer_schemes_save_and_reload(scheme: str, group: int | None, tmp_path: Path) -> None:
    from lowbit.checkpoint.export import save_checkpoint
    from lowbit.checkpoint.load import load

    m = qwen3_moe(dtype=torch.bfloat16)
    s = get_scheme(scheme, group_size=group)
    rep = quantize_model(m, s, None, progress=False)
    assert all(isinstance(e.down_proj, QuantLinear) and e.down_proj.weight_args == s.weights
               for _, le in expert_modules(m) for e in le.experts())  # every scheme reaches the experts
    save_checkpoint(m, word_tokenizer(), tmp_path / "ck", scheme=s, ignore=rep.ignored, provenance={})
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ck")(input_ids=ids).logits, m(input_ids=ids).logits)


def test_a_group_size_that_does_not_divide_an_expert_names_it() -> None:
    # hidden 64 splits into groups of 64; the experts' down projections take 32 inputs
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj: group size 64 does not "
                                          r"divide the input dimension 32"):
        quantize_model(qwen3_moe(), get_scheme("w4a16", group_size=64), None, progress=False)


def test_allow_partial_keeps_unreadable_3d_weights_and_the_gate_records_them(tmp_path: Path) -> None:
    from lowbit.checkpoint.export import save_checkpoint
    from lowbit.checkpoint.integrity import gate_findings

    m = qwen3_moe(dtype=torch.bfloat16)
    m.model.layers[0].mlp.mystery = nn.Module()
    m.model.layers[0].mlp.mystery.table = nn.Parameter(torch.ones(2, 3, 4, dtype=torch.bfloat16))
    s = get_scheme("fp8-dynamic")
    rep = quantize_model(m, s, None, progress=False, allow_partial=True)
    assert m.model.layers[0].mlp.mystery.table.dim() == 3  # left as it was

    def gate(d: Path, config: dict, tensors: dict) -> tuple[list[str], dict]:
        return gate_findings(m, d, config, tensors, targets=rep.targets, ignored=rep.ignored,
                             experts_without_tokens=[], tokenizer=None)

    with pytest.raises(LowbitError, match="unquantized 3-D expert weights, e.g. model.layers.0.mlp.mystery"):
        save_checkpoint(m, word_tokenizer(), tmp_path / "a", scheme=s, ignore=rep.ignored, provenance={}, gate=gate)
    assert not (tmp_path / "a").exists()
    save_checkpoint(m, word_tokenizer(), tmp_path / "b", scheme=s, ignore=rep.ignored, provenance={}, gate=gate,
                    allow_partial=True)
    prov = json.loads((tmp_path / "b" / "lowbit_provenance.json").read_text())
    assert not prov["integrity"]["passed"] and "mystery" in prov["integrity"]["failures"][0]
