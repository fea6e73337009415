"""A custom-loop pipeline whose dense stages leave a layer frozen and whose last stage is LoRA (the final model is a
``PeftModel``): replay must train only what each stage trained. Stage functions take the step-limited form."""

from __future__ import annotations

from typing import Any

import torch

STEPS = 4


def frozen_layer_then_lora(root: Any) -> tuple[Any, Any, dict[str, Any], Any]:
    """``(ledger, final PeftModel, stage_fns, behavior)``: stages s1, s2 train layers 2 only (layer 0 was frozen by the
    user before them, outside the stage functions, as a recipe freezes an embedding matrix once); s3 is LoRA on
    layer 2."""
    from peft import LoraConfig, get_peft_model

    from hf_stage_attribution import StageLedger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def train(m, i, ledger=None, max_steps=None):
        torch.manual_seed(10 + i)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
        ctx = ledger.record_stage(f"s{i + 1}", model=m, optimizer=opt) if ledger is not None else None
        rec = ctx.__enter__() if ctx else None
        for _ in range(STEPS if max_steps is None else min(STEPS, max_steps)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), (y + i) % 3).backward()
            opt.step()
            if rec:
                rec.step()
        if ctx:
            ctx.__exit__(None, None, None)
        return m, opt

    def lora(m, ledger=None, max_steps=None):
        torch.manual_seed(20)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["2"])
        return train(get_peft_model(m, config), 2, ledger, max_steps)

    ledger = StageLedger(root / "ledger")
    model[0].requires_grad_(False)
    for i in range(2):
        train(model, i, ledger)
    final, _ = lora(model, ledger)
    fns = {
        "s1": lambda m, max_steps=None: train(m, 0, max_steps=max_steps),
        "s2": lambda m, max_steps=None: train(m, 1, max_steps=max_steps),
        "s3": lambda m, max_steps=None: lora(m, max_steps=max_steps),
    }
    behavior = lambda m: torch.log_softmax(m(x), -1)[:, 0]  # noqa: E731
    return ledger, final, fns, behavior
