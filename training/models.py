"""Building torchvision classifiers with a new classification head.

Shipped inside the model archive next to the handler (imported flat as ``models``), so the
server rebuilds exactly the architecture that was trained. No TorchServe import here.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)


def make_head(in_features: int, num_classes: int, *, hidden_units: Optional[int] = None,
              dropout: float = 0.0) -> nn.Module:
    """The new classifier head.

    Linear (``Dropout -> Linear`` when ``dropout > 0``), or one hidden layer:
    ``Linear(in, hidden) -> ReLU -> Dropout -> Linear(hidden, num_classes)``.
    Outputs logits float32 [B, num_classes].
    """
    if hidden_units:
        return nn.Sequential(
            nn.Linear(in_features, hidden_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_units, num_classes),
        )
    if dropout > 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Linear(in_features, num_classes)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Finds the classifier: the last ``nn.Linear`` registered in the model.

    That is ``classifier`` (DenseNet), ``classifier.6`` (VGG), ``fc`` (ResNet, RegNet),
    ``heads.head`` (ViT), ``classifier.1`` (EfficientNet, MobileNet), ``classifier.2``
    (ConvNeXt), ``head`` (Swin).

    Raises:
        ValueError: the model has no ``nn.Linear`` (e.g. SqueezeNet's conv classifier).
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear classifier to replace; "
            "choose another architecture"
        )
    return found


def _resolve_weights(arch: str, weights: str):
    """Maps the ``weights`` argument to a torchvision weights enum, or None."""
    if weights.lower() == "none" or os.path.isfile(weights):
        return None
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(
            f"unknown weights {weights!r} for {arch}: use none, a local state_dict file, "
            f"DEFAULT or one of {[w.name for w in enum]}"
        ) from None


def build_model(arch: str, num_classes: int, *, weights: str = "none",
                hidden_units: Optional[int] = None, dropout: float = 0.0,
                freeze_backbone: bool = False) -> nn.Module:
    """Builds a torchvision classifier and replaces its head.

    Args:
        arch: any name in ``torchvision.models.list_models(torchvision.models)`` with a
            linear classifier, e.g. ``densenet121``, ``vgg16``, ``resnet50``.
        num_classes: outputs of the new head.
        weights: ``none`` (random init), a torchvision weights name (``DEFAULT``,
            ``IMAGENET1K_V1``, ...; read from ``$TORCH_HOME/hub/checkpoints`` or downloaded),
            or the path of a local state_dict file for the original (ImageNet) model.
        hidden_units: if set, a head with one hidden layer of this width.
        dropout: dropout probability in the head.
        freeze_backbone: if True, only the head's parameters require gradients.

    Returns:
        The model, in train mode, on CPU. Its forward maps float32 [B, 3, H, W] to logits
        float32 [B, num_classes].

    Raises:
        ValueError: unknown architecture or weights name, or no linear classifier.
    """
    classification = torchvision.models.list_models(torchvision.models)
    if arch not in classification:
        raise ValueError(f"unknown architecture {arch!r}; torchvision offers {classification}")
    model = torchvision.models.get_model(arch, weights=_resolve_weights(arch, weights))
    if os.path.isfile(weights):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        model.load_state_dict(state)
        logger.info("loaded backbone weights from %s", weights)

    name, old = _last_linear(model)
    head = make_head(old.in_features, num_classes, hidden_units=hidden_units, dropout=dropout)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)

    if freeze_backbone:
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
    return model


def load_trained(arch: str, num_classes: int, head: Optional[dict], state_dict: dict) -> nn.Module:
    """Rebuilds a model trained by ``training/train.py`` from its saved parts.

    Args:
        arch, num_classes: as given to ``build_model``.
        head: ``{"hidden_units", "dropout"}`` of the head (None/{}: a plain Linear).
        state_dict: the trained weights.

    Returns:
        The model in eval mode, on CPU, fp32.

    Raises:
        RuntimeError: ``state_dict`` does not fit the rebuilt model.
    """
    head = head or {}
    model = build_model(arch, num_classes, hidden_units=head.get("hidden_units"),
                        dropout=head.get("dropout", 0.0))
    model.load_state_dict(state_dict)
    return model.eval()
