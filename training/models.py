"""Fine-tuning's side of the models: pretrained weights, their preprocessing, which stages train.

The architectures themselves (the two zoos, ``canonical_arch``, the head, ``FlipAverage``,
``load_trained``) live in ``handler/architectures.py``, which the model archive ships, so the
worker rebuilds exactly what was trained.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torchvision
from torch import nn

from handler.architectures import TIMM_PREFIX, canonical_arch, replace_head, timm_zoo
from training.weights import load_packaged_weights

logger = logging.getLogger(__name__)


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


def _create(arch: str, weights: str) -> nn.Module:
    """The zoo's model with its original (ImageNet) head, weights loaded per ``weights``."""
    if arch.startswith(TIMM_PREFIX):
        name = arch.removeprefix(TIMM_PREFIX)
        if weights.lower() not in ("none", "default", "package") and not os.path.isfile(weights):
            raise ValueError(f"unknown weights {weights!r} for {arch}: use none, package, "
                             "DEFAULT (timm's pretrained tag, from the Hugging Face cache or "
                             "downloaded) or a local state_dict file")
        model = timm_zoo().create_model(name, pretrained=weights.lower() == "default")
        if weights.lower() == "package":
            logger.info("loaded ImageNet weights of %s from %s", arch,
                        load_packaged_weights(name, model))
        return model
    if weights.lower() == "package":
        raise ValueError(f"--weights package: no installed package ships {arch} weights; "
                         "use timm/tf_efficientnet_lite0 (or lite1, lite2), or DEFAULT with "
                         "the file in $TORCH_HOME/hub/checkpoints/")
    return torchvision.models.get_model(arch, weights=_resolve_weights(arch, weights))


def build_model(arch: str, num_classes: int, *, weights: str = "none",
                hidden_units: Optional[int] = None, dropout: float = 0.0,
                freeze_backbone: bool = False) -> nn.Module:
    """Builds a torchvision or timm classifier and replaces its head.

    Args:
        arch: a torchvision classification model name (``densenet121``, ``vgg16``,
            ``resnet50``, ...) or a timm one (``tf_efficientnet_lite0``, ``timm/resnet50``);
            see ``canonical_arch`` for which zoo a name goes to.
        num_classes: outputs of the new head.
        weights: ``none`` (random init); ``package`` (ImageNet weights shipped in an installed
            package, ``training/weights.py``: timm's ``tf_efficientnet_lite0/1/2``);
            ``DEFAULT`` or a torchvision weights name (``IMAGENET1K_V1``; read from
            ``$TORCH_HOME/hub/checkpoints`` or downloaded; for timm, its pretrained tag
            from the Hugging Face cache or downloaded); or the path of a local state_dict
            file of the original (ImageNet-head) model.
        hidden_units: if set, a head with one hidden layer of this width.
        dropout: dropout probability in the head.
        freeze_backbone: if True, only the head's parameters require gradients.

    Returns:
        The model, in train mode, on CPU. Its forward maps float32 [B, 3, H, W] to logits
        float32 [B, num_classes].

    Raises:
        ValueError: unknown architecture or weights name, or no linear classifier.
        FileNotFoundError: ``package`` weights whose package is not installed.
        RuntimeError: weights that do not fit the architecture.
    """
    arch = canonical_arch(arch)
    model = _create(arch, weights)
    if os.path.isfile(weights):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        model.load_state_dict(state)
        logger.info("loaded backbone weights from %s", weights)

    head = replace_head(model, num_classes, hidden_units=hidden_units, dropout=dropout)

    if freeze_backbone:
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
    return model


def pretrained_preprocessing(arch: str, weights: str) -> Optional[dict]:
    """The eval preprocessing the pretrained weights were made for, or None (random init or a
    local file: the caller's defaults apply).

    timm: the architecture's ``pretrained_cfg`` (``input_size``, ``crop_pct``, ``mean``,
    ``std``, ``interpolation``; ``resize_size = floor(crop / crop_pct)`` as timm's
    ``transforms_factory`` computes it). torchvision: the weights enum's ``transforms()``
    (``ImageClassification``: crop, resize, mean, std, interpolation).

    Returns:
        ``EvalTransform`` keyword arguments, or None.
    """
    import math

    arch = canonical_arch(arch)
    if weights.lower() == "none" or os.path.isfile(weights):
        return None
    if arch.startswith(TIMM_PREFIX):
        cfg = timm_zoo().models.get_pretrained_cfg(arch.removeprefix(TIMM_PREFIX))
        if cfg is None:
            return None
        crop = int(cfg.input_size[-1])
        interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") \
            else "bilinear"
        return {"crop_size": crop, "resize_size": math.floor(crop / cfg.crop_pct),
                "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": interpolation}
    tf = _resolve_weights(arch, weights).transforms()
    return {"crop_size": int(tf.crop_size[0]), "resize_size": int(tf.resize_size[0]),
            "mean": list(tf.mean), "std": list(tf.std), "interpolation": tf.interpolation.value}


def set_head(model: nn.Module, module: nn.Module) -> nn.Module:
    """Puts ``module`` where ``build_model`` put the head; returns the module it replaces.

    With ``nn.Identity()`` the model maps float32 [B, 3, H, W] to its pooled features
    float32 [B, F], the head's input (``training/features.py``).
    """
    parent_name, _, attr = model.head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's parameterised stages in forward order, head excluded.

    Top-level children, with long containers (``blocks`` of timm EfficientNets, ``features``
    of torchvision's DenseNet/VGG/MobileNet, ``layers``: a Sequential or ModuleList of more
    than 3 modules) expanded one level: timm ``tf_efficientnet_lite0`` gives ``conv_stem``,
    ``bn1``, ``blocks.0`` .. ``blocks.6``, ``conv_head``, ``bn2``; torchvision ``densenet121``
    gives ``features.conv0`` .. ``features.denseblock4``, ``features.norm5``.
    """
    found = []

    def walk(prefix: str, module: nn.Module, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == model.head_name or model.head_name.startswith(full + "."):
                if full != model.head_name and depth == 0:
                    walk(full + ".", child, depth + 1)  # e.g. VGG's classifier.0 .. classifier.5
                continue
            if not any(True for _ in child.parameters()):
                continue
            if depth == 0 and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 3:
                walk(full + ".", child, depth + 1)
            else:
                found.append((full, child))

    walk("", model, 0)
    return found


def train_last(model: nn.Module, n: int) -> list[str]:
    """Freezes all but the head and the last ``n`` of ``stages(model)``; parameters the model
    holds outside any stage (a ViT's ``cls_token``, ``pos_embed``) are frozen too.

    Batch norms in frozen stages should then run in eval mode (``freeze_batchnorm_stats``).

    Returns:
        The names of the stages left trainable.
    """
    parts = stages(model)
    trainable = [(name, module) for name, module in parts[len(parts) - n:]] if n > 0 else []
    model.requires_grad_(False)
    model.get_submodule(model.head_name).requires_grad_(True)
    for _, module in trainable:
        module.requires_grad_(True)
    return [name for name, _ in trainable]


def freeze_batchnorm_stats(model: nn.Module, *, all_norms: bool = False) -> None:
    """Puts batch norms in eval mode (call after ``model.train()``): they normalize with their
    running statistics and keep them.

    Args:
        all_norms: every batch norm (their scale and shift still train), as the usual
            fine-tuning recipe for pretrained backbones on small data does (Keras' transfer
            learning guide: "keep the BatchNormalization layers in inference mode"); False:
            only those whose parameters are all frozen.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (all_norms or not any(
                p.requires_grad for p in module.parameters())):
            module.eval()
