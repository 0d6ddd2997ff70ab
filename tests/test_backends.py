"""Inference back-ends (handler/backends.py) against the eager fp32 model they replace."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, encode, scene
from handler.backends import int8_weight_bits, make_runner, onnx_file
from training.export import (batchnorm_as_depthwise_conv, classifier_layers, concat_groups,
                             depthwise_stem_layers, export_onnx,
                             gate_int8_files, onnx_predictions, quantize_int8,
                             quantize_int8_files)
from training.predict import load_classifier

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def reference(three_class_checkpoint):
    """(eager model, preprocessed photos-like images float32 [12, 3, 64, 64], eager logits)."""
    model, _, tf = load_classifier(three_class_checkpoint, torch.device("cpu"))
    images = torch.stack([tf.load(encode(scene(200, 150, seed=s))) for s in range(12)])
    with torch.inference_mode():
        logits = model(images.contiguous(memory_format=torch.channels_last))
    return model, images, logits


@pytest.fixture(scope="module")
def onnx_fp32(reference, tmp_path_factory):
    return export_onnx(reference[0], 64, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnxruntime_fp32_matches_eager_at_every_batch_size(reference, onnx_fp32):
    _, images, logits = reference
    run = make_runner("onnxruntime", None, onnx_path=str(onnx_fp32), num_threads=1)
    for n in (1, 5, 12):  # the exported batch dimension is dynamic
        out = run(images[:n].contiguous(memory_format=torch.channels_last))
        assert out.dtype == torch.float32 and out.shape == (n, 3)
        torch.testing.assert_close(out, logits[:n], atol=1e-4, rtol=1e-4)


def test_int8_is_quantized_and_stays_close_to_fp32(reference, onnx_fp32, tmp_path):
    import onnx

    _, images, logits = reference
    int8 = quantize_int8(onnx_fp32, tmp_path / "model.int8.onnx", images[:8])
    graph = onnx.load(str(int8)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    # weights in 7 bits (reduce_range), which AVX2's u8 x s8 kernels add without saturating
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
    assert int8.stat().st_size < onnx_fp32.stat().st_size / 2  # int8 weights
    out = make_runner("onnxruntime-int8", None, onnx_path=str(int8), num_threads=1)(images)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    # quantization error, relative to how far apart the logits are: small but not zero
    err = (out - logits).abs().max() / logits.std()
    assert 0 < err < 0.25, float(err)
    assert onnx_predictions(int8, images).tolist() == out.argmax(1).tolist()


def test_8bit_weights_use_the_full_range_in_half_the_step(tiny_densenet, tmp_path):
    """The VNNI graph: the same quantization with weights in 8 bits: every weight's rounding
    step (its per-channel scale) is half the 7-bit one, and the model stays close to fp32."""
    import onnx
    from onnx import numpy_helper

    path, images, logits = tiny_densenet
    files = quantize_int8_files(path, tmp_path, images)
    assert {b: p.name for b, p in files.items()} == {7: "model.int8.onnx", 8: "model.int8-w8.onnx"}
    peak, scales = {}, {}
    for bits, file in files.items():
        graph = onnx.load(str(file)).graph
        init = {t.name: t for t in graph.initializer}
        weights = {n.input[0]: numpy_helper.to_array(init[n.input[1]]) for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in init
                   and init[n.input[0]].data_type == onnx.TensorProto.INT8}
        peak[bits] = max(int(np.abs(numpy_helper.to_array(init[w]).astype(np.int16)).max())
                         for w in weights)
        scales[bits] = weights
    assert peak[7] <= 64 < peak[8] <= 128
    assert scales[7].keys() == scales[8].keys() and len(scales[7]) >= 10
    for name, scale7 in scales[7].items():
        np.testing.assert_allclose(scale7 / scales[8][name], 127 / 63, rtol=0.02, err_msg=name)
    # reference arithmetic (no integer kernels), so that no CPU's saturation enters the comparison
    out = _ort_session(files[8], reference=True).run(None, {"images": images.numpy()})[0]
    err = (torch.from_numpy(out) - logits).abs().max() / logits.std()
    assert 0 < err < 0.25, float(err)
    with pytest.raises(ValueError, match="7 or 8"):
        quantize_int8(path, tmp_path / "x.onnx", images, weight_bits=4)


def test_classifier_head_stays_fp32_and_only_its_last_layer(reference, onnx_fp32, tmp_path):
    """``classifier_layers``: the Gemm / MatMul that feed the logits through weight-free ops
    only (one per flip branch), kept out of int8; a hidden layer before them is quantized."""
    import onnx
    from handler.architectures import FlipAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 3)).eval()
    plain = onnx.load(str(export_onnx(net, 32, tmp_path / "plain.onnx")))
    flips = onnx.load(str(export_onnx(FlipAverage(net).eval(), 32, tmp_path / "flips.onnx")))
    gemms = [n.name for n in plain.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 2 and classifier_layers(plain) == gemms[1:]  # the hidden one is not
    flip_gemms = [n.name for n in flips.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(flip_gemms) == 4 and len(classifier_layers(flips)) == 2

    _, images, _ = reference
    int8 = onnx.load(str(quantize_int8(onnx_fp32, tmp_path / "model.int8.onnx", images[:8])))
    (head,) = classifier_layers(onnx.load(str(onnx_fp32)))
    producer = {out: n.op_type for n in int8.graph.node for out in n.output}
    node = next(n for n in int8.graph.node if n.name == head)
    assert producer.get(node.input[1]) is None  # its weight: an fp32 initializer, no DequantizeLinear
    assert producer.get(node.input[0]) == "DequantizeLinear"  # the int8 features come back to fp32
    assert "QLinearConv" not in producer.values() and "QuantizeLinear" in producer.values()


def test_reference_arithmetic_computes_the_int8_model(reference, onnx_fp32, tmp_path):
    """``onnx_predictions(reference=True)`` (the gate of an 8-bit graph on a CPU without VNNI)
    runs the QDQ graph unfused: the same model as the integer kernels, to rounding."""
    _, images, _ = reference
    int8 = quantize_int8(onnx_fp32, tmp_path / "model.int8.onnx", images[:8])
    fused = _ort_session(int8).run(None, {"images": images.numpy()})[0]
    unfused = _ort_session(int8, reference=True).run(None, {"images": images.numpy()})[0]
    spread = float(np.std(fused))
    assert np.abs(fused - unfused).max() < 0.1 * spread
    assert onnx_predictions(int8, images, reference=True).tolist() == unfused.argmax(1).tolist()


def test_gate_measures_each_width_where_it_is_exact_and_refuses_a_lossy_7bit(
        reference, onnx_fp32, tmp_path):
    _, images, _ = reference
    files = quantize_int8_files(onnx_fp32, tmp_path, images[:8])
    fp32 = onnx_predictions(onnx_fp32, images)
    labels = fp32.copy()  # fp32 scores 100 %: the gate's drop is the int8 graphs' disagreement
    avx2 = gate_int8_files(files, images, labels, fp32, max_drop=100, flags=["avx2"])
    assert avx2["fp32_accuracy"] == 100.0 and avx2["served_here"] == 7
    assert {b: w["arithmetic"] for b, w in avx2["weights"].items()} == {7: "native", 8: "reference"}
    assert all(w["accuracy"] == w["top1_agreement"] and w["kept"] for w in avx2["weights"].values())
    vnni = gate_int8_files(files, images, labels, fp32, max_drop=100, flags=["avx512_vnni"])
    assert vnni["served_here"] == 8 and vnni["weights"][8]["arithmetic"] == "native"
    with pytest.raises(ValueError, match="7-bit"):
        gate_int8_files(files, images, labels, fp32, max_drop=-1, flags=["avx2"])


def test_a_worker_reads_the_int8_width_exact_on_its_cpu(tmp_path):
    (tmp_path / "model.int8.onnx").touch()
    assert int8_weight_bits(["avx2", "avx512f"]) == 7 and int8_weight_bits([]) == 7
    assert all(int8_weight_bits(["avx2", f]) == 8 for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert onnx_file("onnxruntime-int8", str(tmp_path), ["avx512_vnni"]).endswith("model.int8.onnx")
    (tmp_path / "model.int8-w8.onnx").touch()  # an archive built with both widths
    assert onnx_file("onnxruntime-int8", str(tmp_path), ["avx512_vnni"]).endswith("model.int8-w8.onnx")
    assert onnx_file("onnxruntime-int8", str(tmp_path), ["avx2"]).endswith("model.int8.onnx")
    assert onnx_file("onnxruntime", str(tmp_path), ["avx512_vnni"]).endswith("model.onnx")
    assert onnx_file("eager", str(tmp_path)) is None


@pytest.fixture(scope="module")
def tiny_densenet(tmp_path_factory):
    """(fp32 ONNX path, images float32 [8, 3, 32, 32], fp32 logits): torchvision's DenseNet
    (pre-activation BN-ReLU-conv layers, concatenated features) at a tiny size, with batch norm
    statistics that are not the identity."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                        bn_size=2, num_classes=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    images = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        logits = model(images)
    path = export_onnx(model, 32, tmp_path_factory.mktemp("densenet") / "model.onnx")
    return path, images, logits


def _ort_session(path, optimized=None, reference=False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if reference:  # as onnx_predictions(reference=True): the QDQ graph unfused
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_batchnorm_as_depthwise_conv_computes_the_same_function(tiny_densenet, tmp_path):
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path, images, logits = tiny_densenet
    quant_pre_process(str(path), str(tmp_path / "prepared.onnx"))
    model = onnx.load(str(tmp_path / "prepared.onnx"))
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    before, statistics = len(norms), {name for n in norms for name in n.input[1:5]}
    # pre-activation norms: each dense layer's norm1, the transition's, norm5 (norm0 and norm2
    # follow a conv and are folded into it by quant_pre_process)
    assert before == 2 + 3 + 1 + 1
    assert batchnorm_as_depthwise_conv(model) == before
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    assert not statistics & {t.name for t in model.graph.initializer}  # dropped, not left unused
    onnx.save(model, str(tmp_path / "dw.onnx"))
    out = _ort_session(tmp_path / "dw.onnx").run(None, {"images": images.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), logits, atol=1e-4, rtol=1e-4)


def test_only_a_depthwise_separable_stem_stays_fp32(tiny_densenet, tmp_path):
    """``depthwise_stem_layers``: MobileNetV2's stem conv and its first block (depthwise 3 x 3,
    then the pointwise conv down to 16 channels) at the stem's resolution; nothing for
    DenseNet, whose dense 7 x 7 stem is fastest in int8, even after its batch norms became
    1 x 1 depthwise convs; and the int8 graph keeps exactly those convs in fp32."""
    import onnx
    import torchvision
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def prepared(path):
        out = tmp_path / f"{path.stem}.prepared.onnx"
        quant_pre_process(str(path), str(out))
        model = onnx.load(str(out))
        batchnorm_as_depthwise_conv(model)
        return model

    dense = prepared(tiny_densenet[0])
    assert any(n.name.endswith(".dw") for n in dense.graph.node)  # 1 x 1 depthwise: not counted
    assert depthwise_stem_layers(dense) == []
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=3).eval()
    mobile = prepared(export_onnx(net, 64, tmp_path / "mobilenet.onnx"))
    stem = depthwise_stem_layers(mobile)
    assert [name.split("/")[2] for name in stem] == ["features.0", "features.1", "features.1"]
    convs = {n.name: n for n in mobile.graph.node if n.op_type == "Conv"}
    assert [dict((a.name, a.i) for a in convs[name].attribute)["group"] for name in stem] == [1, 32, 1]

    images = torch.randn(8, 3, 64, 64)
    int8 = onnx.load(str(quantize_int8(tmp_path / "mobilenet.onnx", tmp_path / "m.int8.onnx", images)))
    producer = {o: n.op_type for n in int8.graph.node for o in n.output}
    weights_dequantized = [producer.get(n.input[1]) == "DequantizeLinear"
                           for n in int8.graph.node if n.op_type == "Conv"]
    assert weights_dequantized[:3] == [False] * 3 and all(weights_dequantized[3:])


def test_int8_densenet_runs_integer_end_to_end_and_concats_copy(tiny_densenet, tmp_path):
    """What makes int8 DenseNet121 fast in ONNX Runtime: no fp32 batch norm between the
    QLinearConvs (nor the layout Transposes around one), and concat inputs quantized exactly
    like the concat's output (QLinearConcat then copies bytes instead of requantizing)."""
    import onnx
    from onnx import numpy_helper

    path, images, logits = tiny_densenet
    int8 = quantize_int8(path, tmp_path / "model.int8.onnx", images)
    model = onnx.load(str(int8))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert len(concats) >= 5 and len(concat_groups(model)) == 2  # one group per dense block
    for concat in concats:
        (quant,) = consumers[concat.output[0]]
        assert quant.op_type == "QuantizeLinear"
        params = {(float(init[quant.input[1]]), int(init[quant.input[2]]))}
        for name in concat.input:
            dq = producer[name]
            assert dq.op_type == "DequantizeLinear"
            params.add((float(init[dq.input[1]]), int(init[dq.input[2]])))
        assert len(params) == 1, (concat.name, params)

    session = _ort_session(int8, optimized=tmp_path / "optimized.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "BatchNormalization" not in ops and ops.count("QLinearConv") >= 1 + 5 * 2 + 1 + 7
    assert ops.count("Transpose") <= 2 and ops.count("DequantizeLinear") <= 1, ops
    out = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    err = (out - logits).abs().max() / logits.std()
    assert 0 < err < 0.25, float(err)


def test_bf16_runs_in_bfloat16_and_returns_float32(reference, three_class_checkpoint):
    _, images, logits = reference
    model, _, _ = load_classifier(three_class_checkpoint, torch.device("cpu"))
    run = make_runner("bf16", model)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        out = run(images.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32
    assert not torch.equal(out, logits)
    torch.testing.assert_close(out, logits, atol=0.1 * logits.abs().max().item(), rtol=0.05)


def test_compile_serves_every_batch_size_up_to_the_compiled_one(reference, three_class_checkpoint):
    _, images, logits = reference
    model, _, _ = load_classifier(three_class_checkpoint, torch.device("cpu"))
    example = images[:4].contiguous(memory_format=torch.channels_last)
    run = make_runner("compile", model, example=example)
    with torch.inference_mode():
        for n in (1, 3, 4):
            out = run(images[:n].contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(out, logits[:n], atol=1e-3, rtol=1e-3)
        with pytest.raises(ValueError, match="compiled batch 4"):
            run(images[:5])


def test_bad_backend_arguments_are_refused(reference):
    with pytest.raises(ValueError, match="unknown backend"):
        make_runner("tensorrt", reference[0])
    with pytest.raises(ValueError, match="model.int8.onnx"):
        make_runner("onnxruntime-int8", None)
    with pytest.raises(ValueError, match="torch model"):
        make_runner("eager", None)
    with pytest.raises(ValueError, match="example"):
        make_runner("compile", reference[0])


# Allocates, touches and frees blocks of 103 and 26 MB (VGG16's and DenseNet121's largest
# activations at batch 8, 224 px), like a forward pass; prints the minor page faults of rounds
# 7-10 (the retained heap settles over the first rounds, as over a worker's first batches).
_REALLOCATE = """
import resource, sys, torch
from handler.backends import retain_heap
print(retain_heap(int(sys.argv[1])))
def touch():
    blocks = [torch.empty(mb << 18).fill_(1.0) for mb in (103, 26, 103, 26)]  # float32
    del blocks
for _ in range(6):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after_warm_up(megabytes: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _REALLOCATE, str(megabytes)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_retain_heap_reuses_freed_pages_instead_of_faulting_them_in_again():
    large = 2 * (103 << 20) // 4096  # pages of the two blocks above glibc's 32 MiB mmap ceiling
    applied, faults = _faults_after_warm_up(0)  # glibc defaults: fresh mmaps every round
    assert not applied and faults >= 2 * large, faults
    applied, faults = _faults_after_warm_up(1024)  # 0 once settled; one block re-faulted at most
    assert applied and faults < large, faults
