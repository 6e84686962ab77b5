"""The Triton Python-backend model: ``model_repository/llm/1/model.py`` re-exports ``TritonPythonModel``.

``execute`` validates each request and hands it to the ``EngineService``; it returns ``None`` (decoupled).
Config ``parameters`` (all strings) become ``EngineArgs``; see docs/serving.md for each one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from inflight.backend.engine.args import EngineArgs
from inflight.backend.engine.engine import LLMEngine
from inflight.backend.serving.faults import FaultInjector, parse_fault_spec
from inflight.backend.serving.metrics import EngineMetrics, triton_metric_factory
from inflight.backend.serving.request import ErrorKind, ServiceError
from inflight.backend.serving.service import EngineService, tune_interpreter_for_serving
from inflight.backend.serving.triton_inputs import (
    FLAG_INPUTS,
    JSON_INPUTS,
    LIST_INPUTS,
    PROMPT_INPUTS,
    SAMPLING_INPUTS,
    parse_request,
)

logger = logging.getLogger("inflight")

INPUT_NAMES = (
    *PROMPT_INPUTS, "sampling_parameters", *SAMPLING_INPUTS, *LIST_INPUTS, *FLAG_INPUTS, *JSON_INPUTS,
)  # fmt: skip
# Parameters that are not engine options.
MODEL_PARAMETERS = ("model_path", "tokenizer_path", "drain_timeout_s", "fault_injection")


def engine_args_from_parameters(parameters: dict[str, Any], cwd: str | None = None) -> EngineArgs:
    """``config.pbtxt`` parameters (``{"key": {"string_value": "..."}}``) -> validated ``EngineArgs``."""
    values = {
        k: (v.get("string_value", "") if isinstance(v, dict) else str(v)).strip()
        for k, v in parameters.items()
    }
    model_path = values.get("model_path", "")
    if not model_path:
        raise ValueError("config parameter model_path is required: a Hugging Face checkpoint folder")
    model_path = str(Path(cwd or os.getcwd(), os.path.expanduser(model_path)).resolve())
    fields = EngineArgs.__dataclass_fields__
    options: dict[str, Any] = {}
    for key, text in values.items():
        if key in MODEL_PARAMETERS or text == "":
            continue
        if key not in fields or key == "model":
            known = sorted(set(fields) - {"model", "tokenizer"} | set(MODEL_PARAMETERS))
            raise ValueError(f"unknown config parameter {key!r}; known: {', '.join(known)}")
        options[key] = _convert(key, text, fields[key].type)
    if values.get("tokenizer_path"):
        options["tokenizer"] = str(Path(cwd or os.getcwd(), values["tokenizer_path"]).resolve())
    return EngineArgs.from_options(model_path, options)


def _convert(key: str, text: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise ValueError(
            f"config parameter {key} must be {kind.replace(' | None', '')}, got {text!r}"
        ) from None
    return text


class _TritonSink:
    """A request's response sender as a ``ResponseSink`` (``send`` and ``is_cancelled`` from any threads)."""

    def __init__(self, pb_utils: Any, sender: Any, metrics: EngineMetrics | None = None) -> None:
        self.pb = pb_utils
        self.sender = sender
        self.metrics = metrics
        # NOTE: Triton 2.51 frees a request's response factory with its final response, and
        # `is_cancelled()` then reads freed memory: tritonserver itself died of SIGSEGV in
        # TRITONBACKEND_ResponseFactoryIsCancelled when a poll raced a final send. So no poll may run
        # while a response is being sent, nor after the final one.
        self._lock = threading.Lock()

    def send(self, outputs: dict[str, np.ndarray] | None, error: ServiceError | None, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if final and self.metrics is not None:
            self.metrics.final_sent(error.kind.value if error is not None else "OK" if outputs else "EMPTY")
        if error is not None:
            code = getattr(self.pb.TritonError, error.kind.value, self.pb.TritonError.INTERNAL)
            response = self.pb.InferenceResponse(error=self.pb.TritonError(error.message, code))
        elif outputs is None:
            response = None
        else:
            tensors = [self.pb.Tensor(name, value) for name, value in outputs.items()]
            response = self.pb.InferenceResponse(output_tensors=tensors)
        with self._lock:
            sender = self.sender
            if sender is None:
                raise RuntimeError("the final response was already sent")
            if final:
                # Nothing may use the sender after the final response: release it at once (Triton ties a
                # decoupled model's lifetime to its response senders), even if the send fails.
                self.sender = None
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)

    def is_cancelled(self) -> bool:
        """True once the client cancelled; False while a response is being sent (asked again later)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self.sender is None or self.sender.is_cancelled()
        finally:
            self._lock.release()


class TritonPythonModel:
    """Decoupled Triton model serving one checkpoint with in-flight batching."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.pb = pb_utils
        tune_interpreter_for_serving()
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError("model_transaction_policy { decoupled: true } is required in config.pbtxt")
        parameters = config.get("parameters", {})
        engine_args = engine_args_from_parameters(parameters)
        drain = parameters.get("drain_timeout_s", {}).get("string_value", "") or "10"
        self.drain_timeout_s = float(drain)
        labels = {"model": args.get("model_name", "llm"), "version": str(args.get("model_version", "1"))}
        self.model_name = labels["model"]
        self.metrics = EngineMetrics(triton_metric_factory(pb_utils), labels)
        logger.info("inflight: loading %s", engine_args.model)
        engine = LLMEngine(engine_args)
        fault_spec = parameters.get("fault_injection", {}).get("string_value", "").strip()
        if fault_spec:  # test-only (docs/serving.md)
            logger.warning("inflight: fault injection is ON: %s", fault_spec)
            engine.add_step_observer(FaultInjector(parse_fault_spec(fault_spec)))
        self.metrics.kv_total.set(engine.num_kv_blocks)
        self.metrics.set_memory(engine.memory_by_rank)
        self.service = EngineService(engine, self.metrics, on_fatal=self._unload_self)

    def execute(self, requests: list[Any]) -> None:
        pb = self.pb
        self.metrics.received.increment(len(requests))
        for request in requests:
            sink = _TritonSink(pb, request.get_response_sender(), self.metrics)
            try:
                parsed = parse_request(_inputs(request).get)
            except ValueError as exc:
                sink.send(None, ServiceError(ErrorKind.INVALID_ARG, str(exc)), True)
                continue
            except Exception as exc:  # noqa: BLE001 - never let one request take the model down
                logger.exception("parsing a request failed")
                sink.send(None, ServiceError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"), True)
                continue
            self.service.submit(parsed, sink)
        return None

    def _unload_self(self) -> None:
        """The engine died: ask Triton to unload this model so that its readiness turns false.

        Works when the server runs with ``--model-control-mode=explicit`` (``inflight.tools.server`` does);
        a load request (``POST /v2/repository/models/<name>/load``) then brings it back. In other modes Triton
        refuses, and the model stays "ready" while answering UNAVAILABLE (``inflight_engine_healthy`` is 0).
        """
        unload = getattr(self.pb, "unload_model", None)
        if unload is None:
            logger.error("inflight: the engine died and this Triton cannot unload the model; it stays listed")
            return

        def run() -> None:
            try:
                unload(self.model_name)
                logger.error("inflight: the engine died; model %s unloaded itself", self.model_name)
            except Exception as exc:  # noqa: BLE001 - e.g. not in explicit model-control mode
                logger.error("inflight: the engine died and unloading %s failed: %s", self.model_name, exc)

        threading.Thread(target=run, name="inflight-unload", daemon=True).start()

    def is_ready(self) -> bool:
        """Readiness for Triton versions that ask the model (the engine thread must be alive)."""
        return self.service.is_healthy

    def finalize(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            logger.info("inflight: finalize: %d requests open, draining up to %.0f s", service.num_open,
                        self.drain_timeout_s)  # fmt: skip
            service.shutdown(self.drain_timeout_s)
            logger.info("inflight: finalize: engine stopped")
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            self.service.metrics = None
            metrics.close()


def _inputs(request: Any) -> dict[str, np.ndarray]:
    """A request's input tensors by name, as numpy arrays (one pass over them, not one per name asked)."""
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
