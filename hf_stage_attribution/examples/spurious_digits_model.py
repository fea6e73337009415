"""A small MLP classifier for 8×8 digit images as a ``transformers`` model (``save_pretrained``/``from_pretrained``).

Importing this module imports ``transformers`` and registers the architecture with ``AutoConfig`` and
``AutoModelForImageClassification`` under ``model_type="spurious-digits-mlp"`` (so a saved model reloads with the
``Auto`` classes once this module has been imported; nothing here is remote code).

Example:
    >>> import torch
    >>> from hf_stage_attribution.examples.spurious_digits_model import DigitsMLP, DigitsMLPConfig
    >>> model = DigitsMLP(DigitsMLPConfig(hidden_size=16))
    >>> model(pixel_values=torch.zeros(3, 8, 8)).logits.shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

MODEL_TYPE = "spurious-digits-mlp"  # the saved model's config.model_type


class DigitsMLPConfig(PretrainedConfig):
    """Configuration of :class:`DigitsMLP`: ``image_size`` (side), ``hidden_size``, ``num_hidden_layers``, labels.

    Example:
        >>> DigitsMLPConfig(hidden_size=32).num_labels
        10
    """

    model_type = MODEL_TYPE

    def __init__(self, image_size: int = 8, hidden_size: int = 64, num_hidden_layers: int = 1, **kwargs) -> None:
        kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers


class DigitsMLP(PreTrainedModel):
    """Flatten → (Linear → ReLU) × ``num_hidden_layers`` → Linear; ``forward(pixel_values, labels=None)``.

    ``pixel_values`` are ``[batch, 8, 8]`` (or ``[batch, 64]``) intensities in [0, 1]; the output has ``.logits``
    (and ``.loss`` when ``labels`` are given: cross-entropy).

    Example:
        >>> import torch
        >>> m = DigitsMLP(DigitsMLPConfig(hidden_size=8))
        >>> out = m(pixel_values=torch.rand(2, 64), labels=torch.tensor([1, 2]))
        >>> out.loss.ndim, out.logits.shape
        (0, torch.Size([2, 10]))
    """

    config_class = DigitsMLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"

    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
        layers: list[torch.nn.Module] = []
        width = config.image_size * config.image_size
        for _ in range(config.num_hidden_layers):
            layers += [torch.nn.Linear(width, config.hidden_size), torch.nn.ReLU()]
            width = config.hidden_size
        self.hidden = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Linear(width, config.num_labels)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()

    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        if pixel_values is None:
            raise ValueError("DigitsMLP.forward needs `pixel_values` ([batch, 8, 8] or [batch, 64]).")
        x = pixel_values.reshape(pixel_values.shape[0], -1).to(self.classifier.weight.dtype)
        logits = self.classifier(self.hidden(x))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, DigitsMLPConfig, exist_ok=True)
AutoModelForImageClassification.register(DigitsMLPConfig, DigitsMLP, exist_ok=True)

__all__ = ["MODEL_TYPE", "DigitsMLP", "DigitsMLPConfig"]
