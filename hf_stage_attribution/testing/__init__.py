"""Tiny offline models, tokenizers and data sets shared by the tests, the recipes and the demo.

Submodules: :mod:`~hf_stage_attribution.testing.lm` (a tokenizer trained on the spot, a tiny GPT-2, a toy
corpus with clean and toxic text), :mod:`~hf_stage_attribution.testing.digits` (scikit-learn digits pipelines).
Nothing here downloads anything.
"""
