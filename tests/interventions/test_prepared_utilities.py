"""A utility built from a generation-based behavior is prepared on the final model, as the target is: the sweep
runs instead of failing with "was not prepared"."""

from __future__ import annotations

import torch

from hf_stage_attribution import StageLedger, behaviors
from hf_stage_attribution.interventions.sweep import scale_stage
from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer


def test_a_generation_utility_is_prepared_before_the_sweep(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ledger = StageLedger(tmp_path / "ledger")
    ids = tok(["the movie was fine", "you are nice"], return_tensors="pt", padding=True)["input_ids"]
    for name in ("pretraining", "sft"):
        with ledger.record_stage(name, model=model, optimizer=opt, curvature_segments=0) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                rec.step()
    prompts = [{"prompt": "you are"}, {"prompt": "the movie was"}]
    options = {"tokenizer": tok, "num_samples": 2, "max_new_tokens": 4, "scorer": "better-profanity"}
    target = behaviors.GenerationToxicity(prompts, name="toxicity", **options)
    gens = behaviors.GenerationToxicity(prompts, name="gens", **options)
    assert gens.needs_prepare
    result = scale_stage(
        ledger, model, "sft", [0.5, 1.0], "delta", target=target, utilities={"gens": gens}, replay=False,
        compare_delta=False,
    )  # fmt: skip
    assert not gens.needs_prepare
    assert all("gens" in point.metrics for point in result.points)
