"""The architectures the handler serves: the two model zoos, the new head, test-time flips.

Which zoo: ``timm/NAME`` is timm's ``NAME``; a plain name is torchvision's when torchvision
has it (``densenet121``, ``vgg16``, ``resnet50``, ...), otherwise timm's
(``tf_efficientnet_lite0``, ``convnext_atto``, ...). Names both zoos share (``resnet50``,
``densenet121``, ``vgg16``, ...) therefore stay torchvision's unless spelt ``timm/resnet50``.
Checkpoints store the resolved name (``canonical_arch``), so the rule is applied once.

Part of the model archive (``handler/`` is shipped whole), so the worker rebuilds exactly the
architecture that was trained; ``training/models.py`` adds pretrained weights and the
fine-tuning helpers on top. No TorchServe import here, and none from ``training/``.
"""

from __future__ import annotations

import difflib
from typing import Optional

import torch
import torchvision
from torch import nn


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


TIMM_PREFIX = "timm/"


def timm_zoo():
    import timm  # imported on demand: torchvision-only archives never need it
    return timm


def canonical_arch(arch: str) -> str:
    """Resolves ``arch`` to its zoo: ``NAME`` (torchvision) or ``timm/NAME`` (timm).

    Raises:
        ValueError: neither zoo has the name; the message lists the closest names of both.
    """
    torchvision_names = torchvision.models.list_models(torchvision.models)
    if not arch.startswith(TIMM_PREFIX) and arch in torchvision_names:
        return arch
    name = arch.removeprefix(TIMM_PREFIX)
    timm_names = timm_zoo().list_models()
    if name in timm_names:
        return TIMM_PREFIX + name
    candidates = ([] if arch.startswith(TIMM_PREFIX) else torchvision_names) + \
        [TIMM_PREFIX + n for n in timm_names]
    close = difflib.get_close_matches(arch, candidates, n=8, cutoff=0.6)
    close += [c for c in difflib.get_close_matches(TIMM_PREFIX + name, candidates, n=8,
                                                   cutoff=0.6) if c not in close]
    raise ValueError(f"unknown architecture {arch!r}: neither torchvision nor timm has it; "
                     f"closest: {', '.join(close[:8]) or 'none'} (torchvision names plain, "
                     f"timm names as timm/NAME or plain when torchvision lacks them)")


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier to replace: timm's ``pretrained_cfg["classifier"]`` (``classifier``,
    ``fc``, ``head.fc``), else the last ``nn.Linear`` (torchvision models)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(name, str):  # a tuple (two heads, distilled models): the last Linear below
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            return name, module
    return _last_linear(model)


def replace_head(model: nn.Module, num_classes: int, *, hidden_units: Optional[int] = None,
                 dropout: float = 0.0) -> nn.Module:
    """Swaps the zoo model's classifier (``classifier_of``) for ``make_head``'s, in place.

    Sets ``model.head_name`` (where the head sits; not part of the state_dict).

    Returns:
        The new head.
    """
    name, old = classifier_of(model)
    head = make_head(old.in_features, num_classes, hidden_units=hidden_units, dropout=dropout)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)
    model.head_name = name
    return head


def create(arch: str) -> nn.Module:
    """The zoo's model for a ``canonical_arch`` name, randomly initialised, ImageNet head.

    Raises:
        ValueError: unknown architecture.
    """
    if arch.startswith(TIMM_PREFIX):
        return timm_zoo().create_model(arch.removeprefix(TIMM_PREFIX), pretrained=False)
    return torchvision.models.get_model(arch, weights=None)


class FlipAverage(nn.Module):
    """Test-time augmentation: each image and its left-right mirror, probabilities averaged.

    Returns ``log(mean of the two softmaxes)``, float32 [N, C], so that the softmax the
    handler applies gives exactly the averaged probabilities (finite: some class always has
    probability >= 1/C). Two forward passes rather than one over a 2N batch: splitting the batch
    again is a dynamic Reshape, which ONNX Runtime's shape inference for int8 cannot follow.
    Used when training found that it raises val accuracy (``training/train.py --tta``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = torch.softmax(self.model(x).float(), dim=1)
        mirrored = torch.softmax(self.model(x.flip(3)).float(), dim=1)
        return torch.log((plain + mirrored) * 0.5)


def load_trained(arch: str, num_classes: int, head: Optional[dict], state_dict: dict,
                 tta: Optional[str] = None) -> nn.Module:
    """Rebuilds a model trained by ``training/train.py`` from its checkpoint's parts.

    Args:
        arch: the checkpoint's ``arch`` (``canonical_arch`` form; resolved again if not).
        num_classes: outputs of the head.
        head: ``{"hidden_units", "dropout"}`` of the head (None/{}: a plain Linear).
        state_dict: the trained weights.
        tta: ``"flip"``: wrap in ``FlipAverage``; None: the model as trained.

    Returns:
        The model in eval mode, on CPU, fp32: float32 [N, 3, H, W] -> logits (or, with
        ``tta``, log-probabilities) float32 [N, num_classes].

    Raises:
        RuntimeError: ``state_dict`` does not fit the rebuilt model.
        ValueError: unknown architecture or ``tta``.
    """
    if tta not in (None, "flip"):
        raise ValueError(f"unknown tta {tta!r}: None or 'flip'")
    head = head or {}
    model = create(canonical_arch(arch))
    replace_head(model, num_classes, hidden_units=head.get("hidden_units"),
                 dropout=head.get("dropout", 0.0))
    model.load_state_dict(state_dict)
    return (FlipAverage(model) if tta == "flip" else model).eval()
