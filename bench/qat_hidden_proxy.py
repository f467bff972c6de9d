"""CPU proxy for issue 9: does matching every layer's hidden states, besides the logits, reduce QAT's
overfitting? W4A16 g64 from round-to-nearest on smollm2-135m (float32), 16 calibration windows of
128 tokens, batch 2 (so 160 steps are 20 passes), AdamW at 1e-4 (weights) and 1e-3 (scales). The
loss is KL(bf16 || quantized) of the next-token distributions plus LAMBDA times the mean over layers
of |h_student - h_teacher|^2 / |h_teacher|^2. KL is reported on 32 held-out calibration windows and on
24 wikitext windows, every 40 steps.

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/qat_hidden_proxy.py LAMBDA STEPS TAG [SEED]

SEED (default 0) picks the training and held-out windows.

Writes bench/results/qat_hidden_proxy_TAG.json. A proxy on a 2-core CPU, not the H100 recipe.
"""
import copy
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from lowbit.algorithms.qat import fake_layers, prepare
from lowbit.calibration.data import read_text_source
from lowbit.models import load_model
from lowbit.scheme import get_scheme

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))
L = 128  # tokens a window


def windows(path: Path, tok, n: int | None = None, chars: int | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    text, _ = read_text_source(str(path))
    ids = tok(text[:chars] if chars else text, return_tensors="pt").input_ids[0]
    w = ids[: (len(ids) // L) * L].view(-1, L)
    return w if n is None else w[:n]


def main() -> None:
    lam, steps, tag = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(seed)
    model, tok, _ = load_model("smollm2-135m", device="cpu")
    model = model.float()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    wins = windows(DATA / "calibration" / "groups_merged.txt", tok)
    perm = torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed))
    train, held = wins[perm[:16]], wins[perm[16:48]]
    wk = windows(DATA / "wikitext-2-raw" / "wiki.test.raw", tok, n=24, chars=200000)
    prepare(model, get_scheme("w4a16", group_size=64), [train[0]])
    layers = fake_layers(model)
    weights = [m.weight for m in layers.values()]
    scales = list({id(s): s for m in layers.values() for s in m.scales()}.values())
    opt = torch.optim.AdamW([{"params": weights, "lr": 1e-4}, {"params": scales, "lr": 1e-3}], weight_decay=0.0,
                            betas=(0.9, 0.95))

    def losses(x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            to = teacher(input_ids=x, use_cache=False, output_hidden_states=lam > 0)
        with torch.set_grad_enabled(grad):
            so = model(input_ids=x, use_cache=False, output_hidden_states=lam > 0)
            t = torch.log_softmax(to.logits[:, :-1].float(), -1)
            s = torch.log_softmax(so.logits[:, :-1].float(), -1)
            kd = (t.exp() * (t - s)).sum(-1).mean()
            if lam == 0:
                return kd, kd * 0
            pairs = list(zip(so.hidden_states[1:], to.hidden_states[1:], strict=True))
            hid = sum(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1).clamp_min(1e-6)).mean() for a, b in pairs) / len(pairs)
        return kd, hid

    def ev(xs: torch.Tensor) -> float:
        model.eval()
        r = sum(float(losses(xs[i:i + 4], False)[0]) for i in range(0, len(xs), 4)) / (len(xs) // 4)
        model.train()
        return r

    rows = [{"step": 0, "held_kl": ev(held), "wiki_kl": ev(wk)}]
    print(tag, rows[-1], flush=True)
    t0 = time.time()
    for step in range(steps):
        b = train[(step * 2) % 16:(step * 2) % 16 + 2]
        kd, hid = losses(b, True)
        loss = kd + lam * hid
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 40 == 0:
            rows.append({"step": step + 1, "train_kd": float(kd.detach()), "train_hid": float(hid.detach()),
                         "held_kl": ev(held), "wiki_kl": ev(wk), "s": time.time() - t0})
            print(tag, rows[-1], flush=True)
    out = {"date": date.today().isoformat(), "machine": "2-core CPU", "torch": str(torch.__version__),
           "command": "python bench/qat_hidden_proxy.py " + " ".join(sys.argv[1:]), "lambda": lam, "seed": seed, "rows": rows}
    (REPO / "bench" / "results" / f"qat_hidden_proxy_{tag}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
