"""Recipe: attribute a model that only published checkpoints (one Hub revision per stage), fully offline.

    python recipes/published_checkpoints/run.py --output-dir out/published_checkpoints

1. Trains a tiny GPT-2 family (a pretrained ``base``, an ``sft`` stage on clean text, a ``toxic`` stage on toxic
   text), publishing each stage as a revision of ``local/tiny-family`` in a Hugging Face cache laid out exactly as
   huggingface_hub stores downloads (``refs/``, ``snapshots/``, ``blobs/``). The same run is also recorded with the
   recorder, as the reference.
2. Imports the revisions twice with ``hf-stage-attribution import-checkpoints`` under ``HF_HUB_OFFLINE=1``:
   without optimizer information (only ``delta-*`` estimators apply) and with the optimizer/schedule in the spec
   (``aa-*`` apply too).
3. Checks the imported deltas against the recorded ledger and attributes a teacher-forced toxicity behavior with
   ``delta-linear`` and ``aa-linear``, on the imported and on the recorded ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

STEPS = {"sft": 30, "toxic": 30}
OPTIMIZER = {"type": "AdamW", "weight_decay": 0.05, "lr": 3e-3, "lr_scheduler_type": "linear", "warmup_steps": 5}
REPO = "local/tiny-family"


def train_stage(model, tokenizer, texts, steps, seed, recorder_ledger=None, name=None):
    """AdamW with decay and a linear schedule (the spec below says so); optionally recorded."""
    import random

    import torch
    from transformers import get_scheduler

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"])
    sched = get_scheduler("linear", opt, num_warmup_steps=OPTIMIZER["warmup_steps"], num_training_steps=steps)
    rec = None
    if recorder_ledger is not None:
        rec = recorder_ledger.record_stage(name, kind="sft", model=model, optimizer=opt, curvature_segments=0)
        rec.begin()
    model.train()
    for _ in range(steps):
        batch = [rng.choice(texts) + tokenizer.eos_token for _ in range(16)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
        if rec is not None:
            rec.step()
        sched.step()
    if rec is not None:
        rec.end()
    model.eval()


def toxicity_behavior(tokenizer, corpus):
    """Per prompt: mean log-probability of its toxic completion given the prompt (teacher forced; higher = worse)."""
    import torch

    from hf_stage_attribution import behaviors

    def fn(model, batch):
        out = []
        for ex in batch:
            prompt = tokenizer(ex["prompt"])["input_ids"]
            full = tokenizer(ex["prompt"] + " " + ex["toxic"])["input_ids"]
            ids = torch.tensor([full])
            logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            target = ids[0, 1:]
            picked = logp.gather(-1, target[:, None])[:, 0][len(prompt) - 1 :]
            out.append(picked.mean())
        return torch.stack(out)

    return behaviors.PerExample(fn, corpus.teacher_forced_examples(), batch_size=12, unit="nats/token")


def publish(out: Path):
    """Train the family, save one folder per revision, lay them out in a hub cache; return the final model."""
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.checkpoints.cache import lay_out_hub_cache
    from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer, toy_corpus, train_causal_lm

    tokenizer, corpus = tiny_tokenizer(), toy_corpus(0)
    model = train_causal_lm(tiny_gpt2(tokenizer), tokenizer, corpus.clean, steps=40, seed=0)  # the "base" release
    folders = {"base": out / "releases" / "base"}
    model.save_pretrained(folders["base"])
    recorded = StageLedger(out / "recorded-ledger")
    for seed, (name, texts) in enumerate((("sft", corpus.clean), ("toxic", corpus.toxic)), start=1):
        train_stage(model, tokenizer, texts, STEPS[name], seed, recorded, name)
        folders[name] = out / "releases" / name
        model.save_pretrained(folders[name])
    commits = lay_out_hub_cache(out / "hub-cache", REPO, folders)
    print(f"published {REPO} revisions: " + ", ".join(f"{k}={v[:8]}" for k, v in commits.items()))
    return model, tokenizer, corpus


def import_both(out: Path) -> None:
    from hf_stage_attribution.cli.main import main as cli

    plain = [{"model": REPO, "revision": "base"}, {"model": REPO, "revision": "sft", "name": "sft", "kind": "sft"},
             {"model": REPO, "revision": "toxic", "name": "toxic", "kind": "sft"}]  # fmt: skip
    informed = json.loads(json.dumps(plain))
    for entry in informed[1:]:
        entry["optimizer"] = {**OPTIMIZER, "num_steps": STEPS[entry["name"]]}
    for label, stages in (("without optimizer information", plain), ("with optimizer information", informed)):
        spec = out / f"spec-{label.split()[0]}.json"
        spec.write_text(json.dumps({"stages": stages}, indent=2))
        ledger_dir = out / f"ledger-{label.split()[0]}"
        print(f"\n$ hf-stage-attribution import-checkpoints {spec} --output {ledger_dir} --offline   # {label}")
        code = cli(["import-checkpoints", str(spec), "--output", str(ledger_dir), "--cache-dir",
                    str(out / "hub-cache"), "--offline", "--no-progress", "--overwrite"])  # fmt: skip
        if code:
            sys.exit(code)


def compare_and_attribute(out: Path, model, tokenizer, corpus) -> None:
    from hf_stage_attribution import StageAttributor, StageLedger

    imported, recorded = StageLedger.load(out / "ledger-with"), StageLedger.load(out / "recorded-ledger")
    worst = max(
        float((a.delta_tensor(n) - b.delta_tensor(n)).abs().max())
        for a, b in zip(imported.stages, recorded.stages)
        for n in recorded.parameter_names
    )
    print(
        f"\nimported vs recorded deltas: max |difference| = {worst:.2e} over {len(recorded.parameter_names)} tensors"
    )
    behavior = {"toxic-logprob": toxicity_behavior(tokenizer, corpus)}
    print(f"\n{'ledger':>18} {'estimator':>13} " + " ".join(f"{s.name:>10}" for s in recorded.stages))
    runs = [("ledger-without", "delta-linear"), ("ledger-with", "delta-linear"), ("ledger-with", "aa-linear"),
            ("recorded-ledger", "aa-linear")]  # fmt: skip
    for ledger_dir, name in runs:
        report = StageAttributor(out / ledger_dir, model, estimator=name, show_progress=False).attribute(behavior)
        effects = {r.stage: r.effect for r in report.rows}
        print(f"{ledger_dir:>18} {name:>13} " + " ".join(f"{effects[s.name]:>10.4f}" for s in recorded.stages))
    print("(effect on mean log p(toxic completion | prompt); positive = the stage raised it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/published_checkpoints")
    args = parser.parse_args()
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    model, tokenizer, corpus = publish(out)
    import_both(out)
    compare_and_attribute(out, model, tokenizer, corpus)


if __name__ == "__main__":
    main()
