"""TorchServe handler: image bytes in, top-k labels with probabilities out.

The model archive holds this file at its top level (TorchServe's worker imports it as
``classifier_handler``), the ``handler/`` package it imports from, ``index_to_name.json``,
``model-config.yaml``, ``model.pt`` and, for the ONNX Runtime back-ends, ``model.onnx`` /
``model.int8.onnx`` + ``model.int8-w8.onnx``. TorchServe puts the unpacked archive on the
worker's ``PYTHONPATH``, so ``handler.*`` resolves to the archive's own copy.

Request forms (``handler/payload.py``; TorchServe's dynamic batching groups requests, and a
request may carry several images):
  * raw body: ``curl -T img.jpg`` or ``--data-binary @img.jpg``
  * multipart: ``curl -F data=@img.jpg [-F topk=3]``; several files: one image each
  * JSON: ``{"data": "<base64>" | ["<base64>", ...], "topk": 3}``
  * KServe v1 ``{"instances": [...]}`` and the Open Inference Protocol ``{"inputs": [...]}``
    (``POST /v1/models/<m>:predict``, ``/v2/models/<m>/infer``)
  * ``POST /invocations?model_name=<m>&topk=3`` (the only route whose query string
    TorchServe 0.12 forwards to the handler)

Explanations (``POST /explanations/<m>``, ``/v1/models/<m>:explain``, ``/v2/models/<m>/explain``;
the same request forms): per image, the top-1 class and a saliency map of where the model
looked (``handler/explanations.py``), on the eager model whatever back-end serves predictions.

Answer per image: ``[{"label", "index", "probability"}, ...]`` sorted by probability,
``min(topk, classes)`` records, wrapped as the request's form asks (``postprocessing.answer``).
A bad request gets a 4xx JSON body in its protocol's form for that request alone; the other
requests of its batch are answered normally. At most ``max_images_per_forward`` images go
through the model at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus

import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.architectures import load_trained
from handler.backends import (ONNX_FILES, default_threads, fastest, make_runner, onnx_file,
                              retain_heap, torch_threads)
from handler.explanations import explanation_answer, explanation_records, saliency
from handler.payload import Batch, InternalError, TooManyImagesError, parse_request, protocol_of
from handler.postprocessing import answer, error_answer, topk_records
from handler.preprocessing import ClientError, intra_op_threads
from handler.settings import HandlerSettings

logger = logging.getLogger(__name__)

class ImageClassifierHandler(BaseHandler):
    """Batched top-k image classification for a torchvision or timm model trained by ``training/``.

    Settings: the ``handler:`` section of ``model-config.yaml``, parsed by
    ``settings.HandlerSettings`` (preprocessing, topk, num_threads, backend, gpu_backends,
    retain_heap_mb); an unknown key fails the load with a message naming it.

    Metrics (declared in ``monitoring/metrics.yaml``; dimensions ModelName, ModelVersion):
    ``classifier_{preprocess,inference,postprocess}_seconds`` (histograms: per image, per batch,
    per batch), ``classifier_batch_size``, ``classifier_images_per_request``,
    ``classifier_top1_probability`` (histograms) and ``classifier_rejected_inputs_total``
    (counter, extra dimension Reason), ``classifier_worker_batches_total`` (counter, extra
    dimension Worker = pid; workers serving = series with a non-zero rate).
    """

    HISTOGRAMS = ("classifier_preprocess_seconds", "classifier_inference_seconds",
                  "classifier_postprocess_seconds", "classifier_batch_size",
                  "classifier_images_per_request", "classifier_top1_probability")
    REJECTED = "classifier_rejected_inputs_total"
    BATCHES = "classifier_worker_batches_total"

    def initialize(self, context):
        """Loads the model, labels and settings. Fails fast on anything missing.

        Replaces ``BaseHandler``'s model loading: the serialized file is a weights-only
        ``torch.save`` dict (``arch``, ``num_classes``, ``head``, ``state_dict``) that
        ``torch.load(weights_only=True)`` reads without unpickling code.

        Raises:
            FileNotFoundError: serialized file or ``index_to_name.json`` missing.
            ValueError: missing/invalid handler settings, or labels not matching the model.
        """
        self.context = context
        self.manifest = context.manifest
        props = context.system_properties
        model_dir = props["model_dir"]
        self.settings = settings = HandlerSettings.from_config(
            (context.model_yaml_config or {}).get("handler"))
        self.transform = settings.preprocessing
        self.default_topk = settings.topk
        model = self.manifest.get("model", {})
        self.model_name = model.get("modelName") or context.model_name
        self.model_version = str(model.get("modelVersion", ""))
        self.decode_budget = settings.decode_budget
        self.backend = settings.backend
        threads = default_threads(settings.num_threads,
                                  int((context.model_yaml_config or {}).get("maxWorkers") or 1))
        torch.set_num_threads(threads)
        retain_mb = settings.retain_heap_mb
        heap = f"{retain_mb} MiB of free heap retained" if retain_heap(retain_mb) else "glibc heap defaults"

        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.map_location = self.device.type

        self.serialized = serialized = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        self._explain_model = None  # the eager model explanations need, built at the first one
        exported = torch.load(serialized, map_location="cpu", weights_only=True)
        with open(os.path.join(model_dir, "index_to_name.json")) as f:
            index_to_name = json.load(f)
        self.labels = [index_to_name[str(i)] for i in range(len(index_to_name))]
        if len(self.labels) != exported["num_classes"]:
            raise ValueError(f"index_to_name.json has {len(self.labels)} labels, the model "
                             f"{exported['num_classes']} outputs")
        gpu_backends = settings.gpu_backends
        choose_on_gpu = self.device.type == "cuda" and bool(gpu_backends)
        model = None
        if self.backend not in ONNX_FILES or choose_on_gpu:
            model = load_trained(exported["arch"], exported["num_classes"], exported.get("head"),
                                 exported["state_dict"], exported.get("tta")).to(self.device,
                                                            memory_format=torch.channels_last)
        size = self.transform.crop_size
        # the layout requests arrive in (EvalTransform.normalize: contiguous NCHW)
        example = torch.zeros(max(int(props.get("batch_size") or 1), 1), 3, size, size,
                              device=self.device)
        start = time.perf_counter()
        if choose_on_gpu:
            self.backend, speed = self._fastest_on_gpu(model, gpu_backends, example)
            logger.info("backend on %s: %s, the fastest of %s images/s at batch %d",
                        self.device, self.backend, speed, example.shape[0])
        onnx = onnx_file(self.backend, model_dir)  # int8: the weight width exact on this CPU
        self.model = make_runner(self.backend, model, onnx_path=onnx, device=self.device,
                                 num_threads=threads, example=example)
        self.threads = threads  # the back-end's; torch's own may be fewer (torch_threads)
        torch.set_num_threads(torch_threads(self.backend, threads, self.device))
        with torch.inference_mode():  # warm-up: first-call allocations happen here, not in a request
            self.model(example[:1])
            self.model(example)
        self._init_metrics(context)
        self.initialized = True
        logger.info("loaded %s (%d classes) on %s, backend %s%s (warm-up %.1f s), default topk "
                    "%d, %d intra-op threads (torch %d), %s", exported["arch"], len(self.labels),
                    self.device, self.backend, f" ({os.path.basename(onnx)})" if onnx else "",
                    time.perf_counter() - start, self.default_topk, threads,
                    torch.get_num_threads(), heap)

    @staticmethod
    def _fastest_on_gpu(model: torch.nn.Module, names: list[str], example: torch.Tensor
                        ) -> tuple[str, dict[str, float]]:
        """Times the torch back-ends ``names`` on the worker's device; returns the fastest and
        the images/s of each (``backends.fastest``). ``model`` is left in fp32."""
        import copy

        runners = {name: make_runner(name, copy.deepcopy(model) if name != "eager" else model)
                   for name in names}
        chosen, speed = fastest(runners, example, min_runs=5, min_seconds=0.5)
        del runners
        return chosen, speed

    def _init_metrics(self, context) -> None:
        """Looks up (or, if the metrics config lacks them, creates) the handler's metrics."""
        self.metric_dims = [context.model_name, self.model_version]
        self.worker_dim = str(os.getpid())
        self.metrics = {}
        cache = context.metrics
        wanted = [(n, "Seconds" if n.endswith("_seconds") else "Count", MetricTypes.HISTOGRAM,
                   ["ModelName", "ModelVersion"]) for n in self.HISTOGRAMS]
        wanted.append((self.REJECTED, "Count", MetricTypes.COUNTER,
                       ["ModelName", "ModelVersion", "Reason"]))
        wanted.append((self.BATCHES, "Count", MetricTypes.COUNTER,
                       ["ModelName", "ModelVersion", "Worker"]))
        for name, unit, kind, dims in wanted:
            try:
                self.metrics[name] = cache.get_metric(name, kind)
            except MetricsCacheKeyError:  # not declared in the metrics config: log only
                self.metrics[name] = cache.add_metric_to_cache(name, unit, dims, kind)

    def _observe(self, name: str, value: float, *extra_dims: str) -> None:
        self.metrics[name].add_or_update(value, self.metric_dims + list(extra_dims))

    def handle(self, data: list, context) -> list:
        """One batch of requests: ``BaseHandler.handle``, with explanations decided per request.

        ``BaseHandler`` looks at the first request's ``explain`` header alone, so a batch that
        mixes ``/predictions`` and ``/explanations`` requests (the frontend batches both from
        one queue) would answer every request the first one's way. Here the predictions go
        through ``inference`` + ``postprocess`` and the explanations through ``explain_batch``,
        and each request gets its own kind of answer.
        """
        start = time.time()
        self.context = context
        if self._is_describe():
            output = [self.describe_handle()]
        else:
            batch = self.preprocess(data)
            output = self.postprocess(self.inference(
                batch.subset(set(range(batch.size)) - batch.explain) if batch.explain else batch))
            if batch.explain:
                explained = self.explain_batch(batch.subset(batch.explain))
                for idx in batch.explain:
                    output[idx] = explained[idx]
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def _wants_explanation(self, idx: int) -> bool:
        """The frontend's ``explain`` header of request ``idx``: it adds ``False`` to every
        request and then ``True`` on the explanation routes; the last value wins, so a
        client's own ``explain`` header does not turn a prediction into an explanation."""
        return bool(self.context) and self.context.get_request_header(idx, "explain") == "True"

    def _explanation_model(self) -> torch.nn.Module:
        """The fp32 eager model (built from the archive's weights at the first explanation:
        an ONNX Runtime or bf16 back-end has no gradients to give)."""
        if self._explain_model is None:
            exported = torch.load(self.serialized, map_location="cpu", weights_only=True)
            self._explain_model = load_trained(
                exported["arch"], exported["num_classes"], exported.get("head"),
                exported["state_dict"], exported.get("tta")).to(self.device).eval()
            for p in self._explain_model.parameters():
                p.requires_grad_(False)
        return self._explain_model

    def explain_batch(self, batch: Batch) -> list:
        """Answers the explanation requests of ``batch``: per image, the top-1 class and its
        saliency map (``explanations.saliency``: ``explain_steps`` integration steps, an
        ``explain_grid`` x ``explain_grid`` map), in each request's form; errors as in
        ``postprocess``. Returns one answer per request index (None for the others)."""
        out: list = [None] * batch.size
        records = []
        if batch.pixels is not None:
            try:
                model = self._explanation_model()
                chunk = self.settings.max_images_per_forward
                with intra_op_threads(self.threads):  # eager gradients, whatever the back-end
                    for first in range(0, len(batch.pixels), chunk):
                        pixels = batch.pixels[first:first + chunk].to(self.device)
                        probs, maps = saliency(model, self.transform.normalize(pixels),
                                               self.settings.explain_steps,
                                               self.settings.explain_grid)
                        records += explanation_records(
                            probs, maps, self.labels,
                            self.transform.crop_size / self.transform.resize_size)
            except Exception:  # an explanation bug must not fail the predictions of the batch
                logger.exception("explanations failed for %d request(s)", len(batch.requests))
                for idx, parsed in batch.requests.items():
                    batch.errors[idx] = (InternalError("internal error while explaining"), parsed.form)
                batch.requests = {}
        if records:
            for idx, parsed in batch.requests.items():
                first, end = batch.spans[idx]
                out[idx] = explanation_answer(parsed.form, records[first:end],
                                              model_name=self.model_name,
                                              model_version=self.model_version,
                                              request_id=parsed.request_id)
        for idx, (exc, form) in batch.errors.items():
            out[idx] = error_answer(form, exc.to_json())
            self._observe(self.REJECTED, 1, exc.reason)
            if self.context is not None:
                self.context.set_response_status(exc.status, HTTPStatus(exc.status).phrase, idx)
        return out

    def preprocess(self, data: list[dict]) -> Batch:
        """Parses each request (one or several images, any accepted form), then decodes,
        resizes and crops every image.

        A bad request (or one bad image in it: the message names which) is recorded in
        ``Batch.errors``, not raised; the batch's other requests go on. Sets ``Batch.pixels``:
        uint8 [M, 3, crop, crop] for the M images of the good requests, in order.
        """
        batch = Batch(size=len(data))
        tensors: list[torch.Tensor] = []
        for idx, row in enumerate(data):
            headers = (self.context.get_all_request_header(idx) if self.context else {}) or {}
            if self._wants_explanation(idx):
                batch.explain.add(idx)
            parsed = None
            try:
                start = time.perf_counter()
                parsed = parse_request(row, headers, self.default_topk,
                                       self.settings.max_images_per_request)
                if idx in batch.explain:
                    cap = self.settings.max_images_per_explanation
                    if len(parsed.images) > cap:
                        raise TooManyImagesError(
                            f"{len(parsed.images)} images in one explanation request: at most "
                            f"{cap} (handler.max_images_per_explanation); split the request")
                images = []
                for i, payload in enumerate(parsed.images):
                    try:
                        images.append(self.transform.load_pixels(payload, self.decode_budget))
                    except ClientError as exc:
                        if len(parsed.images) == 1:
                            raise
                        raise type(exc)(f"image {i} of {len(parsed.images)}: {exc}") from exc
                per_image = (time.perf_counter() - start) / len(images)
                for _ in images:
                    self._observe("classifier_preprocess_seconds", per_image)
                self._observe("classifier_images_per_request", len(images))
            except ClientError as exc:  # answered in the request's protocol, parsed or not
                batch.errors[idx] = (exc, parsed.form if parsed else protocol_of(row, headers))
                continue
            except Exception:  # a decoder bug must not fail the other requests
                logger.exception("request %d: unexpected preprocessing failure", idx)
                batch.errors[idx] = (InternalError("internal error while decoding the image"),
                                     parsed.form if parsed else protocol_of(row, headers))
                continue
            batch.requests[idx] = parsed
            batch.spans[idx] = (len(tensors), len(tensors) + len(images))
            tensors.extend(images)
        if tensors:
            batch.pixels = torch.stack(tensors)
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        """Runs the model on the batch's images, at most ``max_images_per_forward`` at a time:
        sets ``batch.probs`` float32 [M, C].

        Each chunk goes to the device as uint8 NCHW (a quarter of float32's bytes) and is
        scaled and normalized there in one fused step (contiguous NCHW float32), so memory stays
        bounded by the chunk however many images the batch's requests carry.
        """
        if batch.pixels is None:
            return batch
        chunk = self.settings.max_images_per_forward
        probs = []
        for first in range(0, len(batch.pixels), chunk):
            start = time.perf_counter()
            pixels = batch.pixels[first:first + chunk].to(self.device, non_blocking=True)
            with torch.inference_mode():
                out = self.model(self.transform.normalize(pixels)).float().softmax(dim=1)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            probs.append(out)
            self._observe("classifier_inference_seconds", time.perf_counter() - start)
            self._observe("classifier_batch_size", len(pixels))
            self._observe(self.BATCHES, 1, self.worker_dim)
        batch.probs = torch.cat(probs) if len(probs) > 1 else probs[0]
        return batch

    def postprocess(self, batch: Batch) -> list:
        """Returns one JSON-serializable answer per request, in its own protocol's form,
        setting 4xx statuses on errors."""
        start = time.perf_counter()
        out: list = [None] * batch.size
        if batch.probs is not None:
            rows = [(idx, i) for idx in batch.requests for i in range(*batch.spans[idx])]
            ks = [batch.requests[idx].k for idx, _ in rows]
            records = topk_records(batch.probs[[i for _, i in rows]], self.labels, ks)
            for idx, parsed in batch.requests.items():
                first, end = batch.spans[idx]
                mine = records[first:end]
                for image in mine:
                    self._observe("classifier_top1_probability", image[0]["probability"])
                out[idx] = answer(parsed.form, mine, model_name=self.model_name,
                                  model_version=self.model_version, request_id=parsed.request_id)
            self._observe("classifier_postprocess_seconds", time.perf_counter() - start)
        for idx, (exc, form) in batch.errors.items():
            out[idx] = error_answer(form, exc.to_json())
            self._observe(self.REJECTED, 1, exc.reason)
        if self.context is not None:
            for idx in range(batch.size):
                self.context.set_response_content_type(idx, "application/json")
            for idx, (exc, _) in batch.errors.items():
                self.context.set_response_status(exc.status, HTTPStatus(exc.status).phrase, idx)
        return out

