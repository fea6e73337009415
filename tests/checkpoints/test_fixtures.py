"""Builders shared by the checkpoint-import tests (imported as ``test_checkpoints_fixtures``): a tiny GPT-2 and a
recorded custom training loop, so an imported ledger can be compared with the recorder's ledger of the same run."""

from __future__ import annotations

import torch

from hf_stage_attribution import StageLedger


def tiny_gpt2(seed: int = 0, vocab: int = 64, layers: int = 2, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=layers, n_head=2, n_positions=32, tie_word_embeddings=tie)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def train(model, steps: int, lr: float = 1e-2, weight_decay: float = 0.0, seed: int = 0, ledger=None, name=None):
    """A few AdamW steps on random tokens with a linear decay; records the stage when ``ledger`` is given.

    Returns the learning rates applied at each step.
    """
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (steps + 1))
    applied = []
    rec = (
        ledger.record_stage(name, kind="custom", model=model, optimizer=opt, curvature_segments=0)
        if ledger is not None
        else None
    )
    if rec is not None:
        rec.begin()
    for _ in range(steps):
        batch = torch.randint(0, vocab, (4, 8), generator=gen)
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        applied.append(opt.param_groups[0]["lr"])
        if rec is not None:
            rec.step()
        sched.step()
    if rec is not None:
        rec.end()
    return applied


def recorded_run(root, stage_steps=(3, 2), weight_decay: float = 0.0, shard_size: str | None = None):
    """Train a tiny GPT-2 through ``len(stage_steps)`` recorded stages, saving a checkpoint at every boundary.

    Returns ``(recorded ledger, [checkpoint folders], [applied rates per stage])``.
    """
    model = tiny_gpt2()
    ledger = StageLedger(root / "recorded")
    folders = [root / "ckpt-0"]
    model.save_pretrained(folders[0], max_shard_size=shard_size) if shard_size else model.save_pretrained(folders[0])
    rates = []
    for index, steps in enumerate(stage_steps, start=1):
        rates.append(train(model, steps, weight_decay=weight_decay, seed=index, ledger=ledger, name=f"s{index}"))
        folders.append(root / f"ckpt-{index}")
        if shard_size:
            model.save_pretrained(folders[-1], max_shard_size=shard_size)
        else:
            model.save_pretrained(folders[-1])
    return StageLedger.load(root / "recorded"), folders, rates


def assert_same_deltas(imported, recorded, atol: float = 1e-6) -> None:
    """Every stage's dense delta of every parameter agrees, and θ_0 too."""
    assert set(imported.parameter_names) == set(recorded.parameter_names)
    start_a, start_b = imported.initial_state(), recorded.initial_state()
    for name in recorded.parameter_names:
        torch.testing.assert_close(start_a[name], start_b[name], atol=atol, rtol=0)
    assert len(imported.stages) == len(recorded.stages)
    for a, b in zip(imported.stages, recorded.stages):
        for name in recorded.parameter_names:
            torch.testing.assert_close(a.delta_tensor(name), b.delta_tensor(name), atol=atol, rtol=0)


def test_recorded_run_saves_the_recorded_states(tmp_path):
    from safetensors.torch import load_file

    recorded, folders, rates = recorded_run(tmp_path, stage_steps=(2,))
    saved = load_file(str(folders[1] / "model.safetensors"))
    final = recorded.final_state()
    for name in recorded.parameter_names:
        torch.testing.assert_close(final[name], saved[name], atol=1e-6, rtol=0)
    assert len(rates) == 1 and len(rates[0]) == 2 == recorded.stages[0].num_steps
