"""ONNX export and int8 post-training quantization for the ONNX Runtime back-ends.

Used by ``training/archive.py --backend onnxruntime[-int8]``; the handler runs the files with
``handler/backends.py``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from handler.backends import INT8_W8_FILE, ONNX_FILES, int8_weight_bits

logger = logging.getLogger(__name__)

OPSET = 17


def static_same_padding(model: torch.nn.Module, crop_size: int) -> int:
    """Replaces timm's dynamic TF-"SAME" convolutions with static padding for one input size,
    in place.

    timm's ``tf_*`` models (EfficientNet-Lite) pad their stride-2 convolutions the way
    TensorFlow does, asymmetrically, computed from the input's height and width on every call
    (``timm.layers.Conv2dSame``). Traced to ONNX this is a chain of Shape, Gather, Ceil, Sub,
    Div, Max and Pad nodes per conv, which the quantizer leaves in fp32 between Dequantize and
    Quantize nodes. The served input size is fixed (the crop size), so the padding is a
    constant: each such conv becomes ``ZeroPad2d(pads) -> Conv2d(padding=0)`` sharing its
    weights, with ``pads`` from timm's own ``pad_same_arg``. The output is unchanged at that
    size (tested); ONNX Runtime then folds the Pad into the Conv.

    Returns:
        The number of convolutions replaced (5 in tf_efficientnet_lite0; 0 for models
        without ``Conv2dSame``).
    """
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm: no timm modules in the model either
        return 0
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_, args) -> None:  # returns None: the input is left as it is
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, crop_size, crop_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in sizes.items():
        conv = model.get_submodule(name)
        plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                conv.stride, 0, conv.dilation, conv.groups, conv.bias is not None)
        plain.weight, plain.bias = conv.weight, conv.bias
        pads = pad_same_arg([height, width], list(conv.kernel_size), list(conv.stride),
                            list(conv.dilation))  # [left, right, top, bottom]
        model.set_submodule(name, torch.nn.Sequential(torch.nn.ZeroPad2d(pads), plain))
    return len(sizes)


def export_onnx(model: torch.nn.Module, crop_size: int, path: Path) -> Path:
    """Exports ``model`` (fp32, eval) to ONNX with a dynamic batch dimension.

    Input ``images`` float32 [N, 3, crop_size, crop_size]; output ``logits`` float32 [N, C].
    Uses the TorchScript-based exporter (``dynamo=False``): one trace, no extra packages.
    TF-"SAME" convolutions are given static padding for ``crop_size`` first
    (``static_same_padding``); the model is changed in place.
    """
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    replaced = static_same_padding(model, crop_size)
    if replaced:
        logger.info("onnx: %d TF-SAME convolutions padded statically for %d px", replaced,
                    crop_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, crop_size, crop_size),), str(path),
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return path


def batchnorm_as_depthwise_conv(model) -> int:
    """Rewrites each ``BatchNormalization`` on a 4-D tensor as a depthwise 1x1 ``Conv``, in place.

    Inference batch norm is a per-channel affine map, ``y = x * s + b`` with
    ``s = gamma / sqrt(var + eps)`` and ``b = beta - mean * s``: exactly a ``Conv`` with
    ``group = C`` and weight ``s`` as float32 [C, 1, 1, 1], bias ``b`` float32 [C]. The fp32
    output is the same (to rounding). Batch norms right after a conv are folded into it by
    ``quant_pre_process`` first; what is left are pre-activation norms (DenseNet's
    ``norm1`` before each dense layer's ReLU and 1x1 conv, its transitions' ``norm`` and
    ``norm5``: 62 in DenseNet121).

    Why: ONNX Runtime's quantizer has no integer batch norm, so each one ran as
    DequantizeLinear -> fp32 BatchNormalization (NCHW) -> QuantizeLinear, with Transposes to
    and from the NHWC layout of the QLinearConvs around it. As a conv it becomes a QLinearConv
    (per-channel int8 weights hold each ``s`` to within 1/254 of its magnitude; the following
    ReLU is folded into the uint8 output's range) and the whole network stays int8 NHWC:
    DenseNet121 batch 8 on 2 AVX2 cores went from 48 to 25 ms at 64 px and from 303 to 206 ms
    at 224 px (docs/performance.md "How the int8 graph is prepared").

    Args:
        model: an ``onnx.ModelProto`` after shape inference (``quant_pre_process``); norms whose
            input rank is unknown or not 4, or that have ``training_mode`` set, are left alone.

    Returns:
        The number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    rank = {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(graph.value_info) + list(graph.input)
            if v.type.tensor_type.HasField("shape")}
    nodes, rewritten, unused = [], 0, set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "BatchNormalization" or rank.get(node.input[0]) != 4
                or attrs.get("training_mode", 0) or len(node.output) != 1
                or not all(name in init for name in node.input[1:5])):
            nodes.append(node)
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(init[name]).astype(np.float64)
                                  for name in node.input[1:5])
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        bias = beta - mean * scale
        channels = len(scale)
        # node names may be empty or repeated: number the new initializers instead
        prefix = f"bn_as_dw_conv_{rewritten}"
        graph.initializer.extend([
            numpy_helper.from_array(scale.reshape(channels, 1, 1, 1).astype(np.float32),
                                    f"{prefix}.weight"),
            numpy_helper.from_array(bias.astype(np.float32), f"{prefix}.bias")])
        nodes.append(helper.make_node(
            "Conv", [node.input[0], f"{prefix}.weight", f"{prefix}.bias"], list(node.output),
            name=f"{node.name or prefix}.dw", group=channels, kernel_shape=[1, 1]))
        rewritten += 1
        unused.update(node.input[1:5])
    del graph.node[:]
    graph.node.extend(nodes)
    unused -= {name for node in graph.node for name in node.input}  # shared with another node
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)  # without the rewritten norms' gamma, beta, mean and var
    return rewritten


def concat_groups(model) -> list[list[str]]:
    """Tensor names that must share one quantization range for ``Concat`` to copy, grouped.

    A group is the inputs and outputs of a chain of concats (in DenseNet, one dense block: the
    block's input, every layer's new features, every running concatenation), plus, back from
    any of them, the inputs of ops that ONNX Runtime's QDQ quantizer quantizes exactly like
    their input (``QDQDirect8BitOp`` in its registry: MaxPool, AveragePool, Reshape, ...): the
    quantizer gives such an op's output its input's range whatever is asked for the output.
    """
    from onnxruntime.quantization.operators.direct_q8 import QDQDirect8BitOp
    from onnxruntime.quantization.registry import QDQRegistry

    same_as_input = {op for op, cls in QDQRegistry.items() if issubclass(cls, QDQDirect8BitOp)}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in model.graph.node:
        if node.op_type == "Concat":
            for name in list(node.input) + list(node.output):
                parent[root(name)] = root(node.output[0])
    for node in reversed(model.graph.node):  # topological order reversed: chains back to front
        if node.op_type in same_as_input and node.output[0] in parent:
            parent[root(node.input[0])] = root(node.output[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(root(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def shared_concat_ranges(model_path: Path, reader, workdir: Path) -> dict[str, list[dict]]:
    """Calibrates ``model_path`` and gives every tensor of each ``concat_groups`` group the union
    of the group's ranges, as ONNX Runtime ``TensorQuantOverrides`` (``{"rmin", "rmax"}``).

    Why: ``QLinearConcat`` copies an input as it is when its scale and zero point equal the
    output's, and otherwise requantizes every byte through a lookup table. DenseNet121 copies
    its growing feature maps 58 times, so with one range per dense block its concats cost
    about a third as much: 211-220 ms -> 182-185 ms per batch of 8 at 224 px on 2 AVX2 cores.
    The wider range costs precision in the narrower tensors: top-1 on the 750 intel-scenes
    test photos (64 px) was 79.87 % against 79.73 % without sharing and 80.0 % in fp32; the
    archive's accuracy gate checks every model.

    Args:
        model_path: the fp32 ONNX model to be quantized.
        reader: a fresh ``CalibrationDataReader`` over the calibration batches.
        workdir: a scratch folder for ONNX Runtime's augmented model.
    """
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    groups = concat_groups(onnx.load(str(model_path)))
    if not groups:
        return {}
    calibrator = create_calibrator(str(model_path), None,
                                   augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    overrides = {}
    for group in groups:
        known = [ranges[name].range_value for name in group if name in ranges]
        if not known:
            continue
        low = np.float32(min(float(np.min(lo)) for lo, _ in known))
        high = np.float32(max(float(np.max(hi)) for _, hi in known))
        overrides.update({name: [{"rmin": low, "rmax": high}] for name in group})
    return overrides


def quantize_int8(fp32_path: Path, path: Path, calibration: torch.Tensor,
                  weight_bits: int = 7, *, fp32_stem: bool = True) -> Path:
    """Static int8 quantization of an fp32 ONNX model with ONNX Runtime.

    QDQ format, per-channel symmetric int8 weights in ``weight_bits`` bits (7:
    ``reduce_range``, 8: full range), uint8 activations whose ranges come from running
    ``calibration`` (float32 [N, 3, H, W], preprocessed images) through the model (MinMax
    calibration: ``onnxruntime.quantization.quantize_static`` defaults).

    Why two widths: on CPUs without VNNI (AVX2, AVX-512F alone) ONNX Runtime's u8 x s8 kernels
    add pairs of products in int16 (``vpmaddubsw``), which saturates with full-range weights;
    its quantization guide recommends ``reduce_range`` there. Lite0 at 160 px on an AVX2 CPU
    (intel-scenes test, 750 photos): 89.6 % with 8-bit weights against 91.3 % fp32 (94.9 %
    top-1 agreement), 91.1 % with 7-bit (98.7 % agreement), at the same speed. With VNNI
    (int32 accumulation) 8 bits are exact and halve the rounding error: the demo's Lite0 on
    AVX-512 VNNI, logits against fp32 on the 450 val photos, RMSE 0.166 against 0.325 and mean
    KL(fp32 || int8) 0.0016 against 0.0074; top-1 94.30 % (= fp32) against 93.78 % on the
    gate's 386 val photos (with the classifier still int8 then; 94.56 % with it in fp32). An
    archive can be served on another CPU than the one that built it, so it carries both
    (``handler.backends.onnx_file`` picks). Before
    quantizing, the graph is prepared for ONNX Runtime's integer kernels:
    ``batchnorm_as_depthwise_conv`` (no fp32 islands) and ``shared_concat_ranges`` (concats
    copy instead of requantizing); the classifier's last layer stays fp32
    (``classifier_layers``), and so does a depthwise-separable network's stem
    (``depthwise_stem_layers``; ``fp32_stem=False`` quantizes it too, for comparison).
    DenseNet121 batch 8 on 2 AVX2 cores: 303 -> 182 ms at 224 px; plain quantization was
    1.23x fp32 eager, this about 2x (docs/performance.md "How the int8 graph is prepared" and
    "Benchmark").

    Returns:
        ``path``.

    Raises:
        ValueError: ``weight_bits`` other than 7 or 8.
    """
    return _quantize_int8_widths(fp32_path, {weight_bits: path}, calibration,
                                 fp32_stem=fp32_stem)[weight_bits]


def _quantize_int8_widths(fp32_path: Path, paths: dict[int, Path], calibration: torch.Tensor,
                          *, fp32_stem: bool = True) -> dict[int, Path]:
    """``quantize_int8`` into ``paths`` ({weight bits: path}), the graph prepared and its concat
    ranges calibrated once for all widths. Returns ``paths``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + 8].numpy() for i in range(0, len(calibration), 8))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    if set(paths) - {7, 8}:
        raise ValueError(f"weight_bits must be 7 or 8, not {sorted(set(paths) - {7, 8})}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph folding
        model = onnx.load(str(prepared))
        logger.info("int8: %d batch norms as depthwise convs", batchnorm_as_depthwise_conv(model))
        onnx.save(model, str(prepared))
        overrides = shared_concat_ranges(prepared, Reader(), Path(tmp))
        stem = depthwise_stem_layers(model) if fp32_stem else []
        if stem:
            logger.info("int8: %d depthwise stem convolutions stay fp32", len(stem))
        fp32_layers = classifier_layers(model) + stem
        for bits, path in paths.items():
            with _root_logger_at_least(logging.WARNING):
                quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=True, reduce_range=bits == 7,
                                nodes_to_exclude=fp32_layers,
                                extra_options={"TensorQuantOverrides": overrides})
    return paths


def depthwise_stem_layers(model) -> list[str]:
    """Names of the convolutions that ``quantize_int8`` keeps in fp32 at the front of a
    depthwise-separable network: the stem and its first block, up to the block's narrowest
    output, when that block is depthwise-separable; ``[]`` for any other network.

    The rule, on a graph in topological order with inferred shapes (``quant_pre_process``):
    take the leading convolutions whose output has the first convolution's height and width
    (the stem's stride, the highest resolution in the network); cut after the one with the
    fewest output channels (the latest on a tie: the cheapest tensor to quantize); return
    them if they include a depthwise convolution (``group`` = input channels, a kernel
    larger than 1x1; the 1x1 ones of ``batchnorm_as_depthwise_conv`` do not count), with every
    other convolution sharing their weights (the mirrored pass of ``FlipAverage``).
    tf_efficientnet_lite0 and MobileNetV2/V3: ``conv_stem``, ``blocks.0``'s depthwise and
    pointwise convolutions (the cut is the 16-channel output at stride 2). DenseNet121,
    ResNet, VGG: none.

    Why: those three layers carry much of Lite0's int8 rounding error, and in ONNX Runtime
    they are no faster in int8 (a 3-channel stem, a 32-channel depthwise at the highest
    resolution). The demo's Lite0 (160 px, 64 val photos calibrating, 2 AMX cores), mean
    KL(fp32 || int8) of the softmax over train / val photos: 8-bit weights 0.00076 / 0.00207
    all int8, 0.00062 / 0.00147 with these in fp32; 7-bit 0.00253 / 0.00608 against 0.00076 /
    0.00249; top-1 disagreements with fp32 on test (Intel's other collection) 8 -> 4 and
    15 -> 7 of 750. Batch 8 took 7.8 ms against 8.4 (alternating runs). The same rule costs
    25 % for DenseNet121's dense 7 x 7 ``conv0`` (73 -> 93 ms at batch 8, no fidelity gain on
    random weights), hence the depthwise condition. The sensitivity of early depthwise layers
    to per-tensor activation ranges: Sheng et al., "A Quantization-Friendly Separable
    Convolution for MobileNets" (2018). docs/performance.md "How the int8 graph is prepared".

    Args:
        model: an ``onnx.ModelProto`` with shapes inferred (``value_info``).
    """
    from onnx import helper

    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    init = {t.name: list(t.dims) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs or len(shapes.get(convs[0].output[0], [])) != 4:
        return []
    first = shapes[convs[0].output[0]][2:]
    region = []
    for node in convs:
        shape = shapes.get(node.output[0], [])
        if len(shape) != 4 or shape[2:] != first:
            break
        region.append(node)
    channels = [shapes[n.output[0]][1] for n in region]
    cut = max(i for i, c in enumerate(channels) if c == min(channels))
    region = region[:cut + 1]

    def depthwise(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = init.get(node.input[1], [])  # [out, in / group, kH, kW]
        in_shape = shapes.get(node.input[0], [])
        return (len(weight) == 4 and weight[1] == 1 and weight[2] * weight[3] > 1
                and len(in_shape) == 4 and attrs.get("group", 1) == in_shape[1] > 1)

    if not any(depthwise(n) for n in region):
        return []
    # a ``FlipAverage`` graph runs the network twice on shared weights: both stems stay fp32
    weights = {n.input[1] for n in region}
    return [n.name for n in convs if n.input[1] in weights]


def classifier_layers(model) -> list[str]:
    """Names of the Gemm / MatMul nodes whose outputs reach a graph output through
    weight-free ops only (softmax, averaging, reshapes): the classifier head's last layer, one
    per ``FlipAverage`` branch. ``quantize_int8`` keeps them in fp32.

    Why: int8 quantizes the classifier's input, and a head with large weights multiplies that
    rounding. The digits demo's head (a linear probe, then fine-tuned) has per-class weight
    maxima of 22 to 241 over 1280 pooled features in [0, 6], which uint8 holds in steps of
    0.024: its logits came out at 1.6 dB signal-to-quantization-noise against 20 dB for the
    features, and int8 digits scored 26.1 % against 97.6 % fp32 on 295 val photos; with its
    classifier in fp32, 98.0 %. The cost is one [N, features] x [features, classes] fp32
    product (1280 x 6 multiply-adds per image for Lite0 on intel-scenes) and one
    DequantizeLinear of the pooled features; VGG16's two 4096-wide hidden layers stay int8.

    Args:
        model: an ``onnx.ModelProto``.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    found, seen = [], set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            found.append(node.name)
        elif node.op_type not in ("Conv", "ConvTranspose"):
            stack.extend(node.input)
    return sorted(found)


# The two int8 graphs an archive carries, by weight bits (``quantize_int8``).
INT8_FILES = {7: ONNX_FILES["onnxruntime-int8"], 8: INT8_W8_FILE}


def quantize_int8_files(fp32_path: Path, dest: Path, calibration: torch.Tensor) -> dict[int, Path]:
    """Both int8 graphs of ``fp32_path`` in folder ``dest``: ``{7: model.int8.onnx, 8:
    model.int8-w8.onnx}`` (``quantize_int8`` with the same calibration and one graph
    preparation)."""
    return _quantize_int8_widths(fp32_path, {bits: dest / name for bits, name in INT8_FILES.items()},
                                 calibration)


def gate_int8_files(files: dict[int, Path], check: torch.Tensor, labels: np.ndarray,
                    fp32: np.ndarray, max_drop: float, flags: Optional[list[str]] = None) -> dict:
    """Scores each int8 graph of ``quantize_int8_files`` on labelled photos and deletes an
    8-bit graph that loses more than ``max_drop`` top-1 points against ``fp32``.

    A graph runs on this CPU's integer kernels where they are exact for it (7 bits always, 8
    bits with VNNI: ``int8_weight_bits``); otherwise (8 bits without VNNI) in reference
    arithmetic (``onnx_predictions(reference=True)``), which is what a VNNI CPU computes.

    Args:
        files: ``{weight bits: path}``.
        check: float32 [N, 3, H, W], preprocessed photos the calibration did not see.
        labels: int64 [N], their classes.
        fp32: int64 [N], the fp32 model's top-1 on ``check``.
        max_drop: accuracy points.
        flags: ``handler.backends.cpu_flags()`` (default: this CPU's).

    Returns:
        ``{"fp32_accuracy", "served_here": weight bits, "weights": {bits: {"accuracy",
        "top1_agreement", "arithmetic": "native" | "reference", "kept"}}}``, percent.

    Raises:
        ValueError: the 7-bit graph (the one every CPU can serve) loses more than ``max_drop``.
    """
    here = int8_weight_bits(flags)
    gate = {"fp32_accuracy": round(100 * float((fp32 == labels).mean()), 2), "weights": {}}
    for bits, path in sorted(files.items()):
        native = bits == 7 or here == 8
        predicted = onnx_predictions(path, check, reference=not native)
        figures = {"accuracy": round(100 * float((predicted == labels).mean()), 2),
                   "top1_agreement": round(100 * float((predicted == fp32).mean()), 2),
                   "arithmetic": "native" if native else "reference"}
        figures["kept"] = gate["fp32_accuracy"] - figures["accuracy"] <= max_drop
        gate["weights"][bits] = figures
        if not figures["kept"]:
            if bits == 7:
                raise ValueError(f"int8 loses {gate['fp32_accuracy'] - figures['accuracy']:.2f} "
                                 f"points of top-1 accuracy with 7-bit weights "
                                 f"({figures['accuracy']} % against fp32's "
                                 f"{gate['fp32_accuracy']} % on {len(labels)} photos); more "
                                 f"than {max_drop}")
            path.unlink()
    gate["served_here"] = 8 if here == 8 and gate["weights"].get(8, {}).get("kept") else 7
    logger.info("int8 gate: %s", gate)
    return gate


@contextlib.contextmanager
def _root_logger_at_least(level: int):
    """Raises the root logger's level for the block: ONNX Runtime's quantizer logs through it
    one INFO line per bias copied and per weight scale widened (about 200 for Lite0)."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def onnx_predictions(path: Path, images: torch.Tensor, reference: bool = False) -> np.ndarray:
    """Top-1 class index per image (int64 [N]) from an ONNX model, on CPU.

    ``reference``: run with ONNX Runtime's graph optimizations off, so that a QDQ graph is
    not fused into integer kernels and runs as written (DequantizeLinear, fp32 op,
    QuantizeLinear): the int8 model's arithmetic without any CPU's saturation, about 7x
    slower. It agreed with VNNI's integer kernels on 99.7-99.9 % of the 750 intel-scenes test
    photos (Lite0, 7- and 8-bit weights).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if reference:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": images[i:i + 32].numpy()})[0].argmax(1)
                           for i in range(0, len(images), 32)])
