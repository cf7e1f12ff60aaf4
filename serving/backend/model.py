"""Triton Python-backend model that runs a variant's model file (the `python` repository flavour): an ONNX file with
ONNX Runtime or OpenVINO, an OpenVINO IR with OpenVINO, an AOTInductor package with torch, with the runtime settings
recorded in the config (`runtime`, `runtime_precision`, `runtime_settings`, `model_file`).

Copied as-is into every version folder next to the model file; it needs numpy, onnxruntime and Triton's
`triton_python_backend_utils` (plus openvino or torch for those runtimes), so it loads in the bundled server and in
any Triton with a Python backend that has them.
It validates every request against the model's config before running it, and runs the requests that
Triton's dynamic batcher hands it together, one ONNX Runtime call per distinct input shape.

Before it loads anything it checks every file of its version against the version's `manifest.json` (sha256, read
in 1 MiB chunks): a changed file (a corrupted external data file, say) fails the load, and Triton keeps serving the
version it had.

Errors are per request: a request refused by validation gets INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT), one
the runtime fails on gets INTERNAL (HTTP 500, gRPC INTERNAL); the other requests of the same call are still answered.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_ORT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_TRITON_TO_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def _error(message: str, code_name: str):
    """An error response with Triton's error code `code_name` (INVALID_ARG: the client's fault, HTTP 400 / gRPC
    INVALID_ARGUMENT; INTERNAL: ours, HTTP 500 / gRPC INTERNAL). Python backends older than error codes get the
    message alone (always INTERNAL there)."""
    code = getattr(pb_utils.TritonError, code_name, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):  # 1 MiB at a time: a data file may be many GB
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(model_name: str, version_dir: str) -> None:
    """Every file the version's `manifest.json` lists must have its recorded sha256; raise TritonModelException
    naming the first that does not, so the load fails and Triton keeps the version it serves. A version without a
    manifest (not written by the repository writer) is loaded as it is, with a warning."""
    manifest_path = os.path.join(version_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        pb_utils.Logger.log_warn(f"{model_name}: {version_dir} has no manifest.json; its files are not verified")
        return
    with open(manifest_path, encoding="utf-8") as handle:
        recorded = json.load(handle)["files"]
    for file_name, expected in sorted(recorded.items()):
        path = os.path.join(version_dir, file_name)
        got = _sha256(path) if os.path.isfile(path) else "missing"
        if got != expected:
            raise pb_utils.TritonModelException(
                f"model '{model_name}': {path} has sha256 {got}, expected {expected} (manifest.json); the version "
                "changed after it was written: publish a fresh version instead of editing this one"
            )


def _parameter(config: dict, key: str, default: str | None = None) -> str | None:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _log_provider(model: str, args: dict, requested: list, got: str) -> None:
    """One line per instance in Triton's log saying which execution provider ONNX Runtime really uses (a warning
    when it is not the first one asked for); `grep tes-provider` finds them."""
    names = [entry[0] if isinstance(entry, tuple) else entry for entry in requested]
    line = (
        f"tes-provider model={model} version={args.get('model_version', '')} "
        f"instance={args.get('model_instance_name', '')} "
        f"kind={args.get('model_instance_kind', '')} got={got} requested={','.join(names)} "
        f"onnxruntime={ort.__version__}"
    )
    (pb_utils.Logger.log_info if got == names[0] else pb_utils.Logger.log_warn)(line)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = [
            (spec["name"], np.dtype(_TRITON_TO_NUMPY[spec["data_type"]]), [int(d) for d in spec["dims"]])
            for spec in config["input"]
        ]
        self.output_names = [spec["name"] for spec in config["output"]]
        self.value_ranges = json.loads(_parameter(config, "value_ranges", "{}"))
        self.max_dims = json.loads(_parameter(config, "max_dims", "{}"))
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        verify_manifest(self.model_name, version_dir)
        model_path = os.path.join(version_dir, _parameter(config, "model_file", "model.onnx"))
        settings = json.loads(_parameter(config, "runtime_settings", "{}"))  # core.runtimes.RuntimeSettings fields
        threads = int(_parameter(config, "intra_op_threads", "0")) or int(settings.get("threads", 0))
        runtime = _parameter(config, "runtime", "onnxruntime")
        if runtime == "openvino":
            self._infer = self._openvino(model_path, _parameter(config, "runtime_precision", "bf16"), threads, settings)
            return
        if runtime == "torch":
            self._infer = self._torch(model_path, threads)
            return
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if settings.get("graph_optimization"):
            options.graph_optimization_level = _ORT_LEVELS[settings["graph_optimization"]]
        if settings.get("spinning") is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["spinning"] else "0")
        requested = self._providers(args, config)
        self.session = ort.InferenceSession(model_path, options, providers=requested)
        self.provider = self.session.get_providers()[0]  # what ONNX Runtime really got: it falls back when one fails
        self._infer = lambda feeds: self.session.run(self.output_names, feeds)
        _log_provider(self.model_name, args, requested, self.provider)

    def _openvino(self, model_path: str, precision: str, threads: int, settings: dict):
        """OpenVINO on the CPU (bf16/int8 kernels ONNX Runtime's CPU provider lacks) for an ONNX file or an IR
        `.xml`, with the settings the precision stage measured best; returns the run function."""
        import openvino as ov

        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": settings.get("performance_hint") or "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if settings.get("streams"):
            config["NUM_STREAMS"] = int(settings["streams"])
        compiled = ov.Core().compile_model(model_path, "CPU", config)
        request = compiled.create_infer_request()
        self.provider = f"OpenVINO {ov.__version__} CPU ({precision}, {config['PERFORMANCE_HINT']})"
        pb_utils.Logger.log_info(f"{self.model_name}: {self.provider}")

        def run(feeds: dict) -> list:
            results = {output.get_any_name(): np.array(value) for output, value in request.infer(feeds).items()}
            return [results[name] for name in self.output_names]

        return run

    def _torch(self, package_path: str, threads: int):
        """An AOTInductor package (torch.compile ahead of time) run by torch; returns the run function."""
        import torch
        from torch._inductor import aoti_load_package

        if threads:
            torch.set_num_threads(threads)
        model = aoti_load_package(package_path)
        names = json.loads(model.get_metadata()["tes_inputs"])
        self.provider = f"torch {torch.__version__} AOTInductor CPU"
        pb_utils.Logger.log_info(f"{self.model_name}: {self.provider}")

        def run(feeds: dict) -> list:
            with torch.inference_mode():
                outputs = model(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names))
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return [output.numpy() for output in outputs]

        return run

    @staticmethod
    def _providers(args: dict, config: dict) -> list:
        """GPU instances ask for TensorRT, then CUDA; every instance ends with the CPU. TensorRT keeps its engines
        and timing cache in `trt_cache_dir` (a config parameter) or the temp folder, per model and version, not in
        the version folder: that one is checksummed (manifest.json) and must not change after it is written."""
        available = ort.get_available_providers()
        chosen: list = []
        if args.get("model_instance_kind") == "GPU":
            device = int(args.get("model_instance_device_id", 0))
            precision = _parameter(config, "precision", "")  # the variant: fp32, fp16, int8-static, ...
            if "TensorrtExecutionProvider" in available:
                root = _parameter(config, "trt_cache_dir", "") or os.path.join(tempfile.gettempdir(), "tes-trt-cache")
                cache = os.path.join(root, config["name"], str(args.get("model_version", "")))
                os.makedirs(cache, exist_ok=True)
                chosen.append(
                    (
                        "TensorrtExecutionProvider",
                        {
                            "device_id": device,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": cache,
                            "trt_timing_cache_enable": True,
                            "trt_timing_cache_path": cache,
                            "trt_fp16_enable": precision in ("fp16", "int8-static")
                            or _parameter(config, "trt_fp16", "false") == "true",
                            "trt_int8_enable": precision == "int8-static",  # explicit QDQ scales: no calibration table
                        },
                    )
                )
            if "CUDAExecutionProvider" in available:
                chosen.append(("CUDAExecutionProvider", {"device_id": device}))
        return chosen + ["CPUExecutionProvider"]

    # --- validation --------------------------------------------------------------------------------
    def _check(self, request) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """The request's inputs as arrays, or an error message naming the tensor, expected and got."""
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, f"model '{self.model_name}': input '{name}' is missing"
            array = tensor.as_numpy()
            if array.dtype != dtype:
                return None, f"model '{self.model_name}': input '{name}' has dtype {array.dtype}, expected {dtype}"
            expected = ([-1] if self.max_batch_size else []) + dims
            shape_ok = array.ndim == len(expected) and all(e in (-1, g) for e, g in zip(expected, array.shape))
            if not shape_ok or 0 in array.shape:
                return None, (
                    f"model '{self.model_name}': input '{name}' has shape {list(array.shape)}, "
                    f"expected {expected} (-1: any size >= 1)"
                )
            sample_shape = array.shape[1:] if self.max_batch_size else array.shape
            limits = self.max_dims.get(name, [])
            if any(size > limit for size, limit in zip(sample_shape, limits)):
                return None, (
                    f"model '{self.model_name}': input '{name}' has shape {list(array.shape)}, "
                    f"expected at most {limits} per sample"
                )
            if self.max_batch_size and array.shape[0] > self.max_batch_size:
                return None, (
                    f"model '{self.model_name}': input '{name}' has batch {array.shape[0]}, "
                    f"expected at most max_batch_size={self.max_batch_size}"
                )
            if name in self.value_ranges and array.size:
                low, high = self.value_ranges[name]
                if not (array.min() >= low and array.max() <= high):  # NaN fails both, so it is refused too
                    return None, (
                        f"model '{self.model_name}': input '{name}' has values in [{array.min()}, {array.max()}], "
                        f"expected values in [{low}, {high}]"
                    )
            arrays[name] = array
        return arrays, None

    # --- execution ---------------------------------------------------------------------------------
    def execute(self, requests):
        """One response per request, never an exception: Triton would fail every request of the call with it."""
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            try:
                arrays, error = self._check(request)
            except Exception as failure:  # a bug of ours, not the client's: INTERNAL, for this request only
                responses[index] = self._internal("validation", failure)
                continue
            if error:
                responses[index] = _error(error, "INVALID_ARG")
                continue
            key = tuple(array.shape[1:] if self.max_batch_size else array.shape for array in arrays.values())
            groups.setdefault(key, []).append((index, arrays))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]], responses: list) -> None:
        """Requests of one shape in one runtime call. If that call fails, each runs alone, so only the requests
        the runtime really fails on get an error (INTERNAL); the others are answered."""
        if self.max_batch_size and len(members) > 1:
            try:
                feeds = {name: np.concatenate([arrays[name] for _, arrays in members]) for name, _, _ in self.inputs}
                outputs = self._infer(feeds)
                sizes = np.cumsum([arrays[self.inputs[0][0]].shape[0] for _, arrays in members])[:-1]
                per_request = [np.split(output, sizes) for output in outputs]
                for position, (index, _) in enumerate(members):
                    tensors = [pb_utils.Tensor(n, parts[position]) for n, parts in zip(self.output_names, per_request)]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                return
            except Exception as failure:  # retried one by one below
                pb_utils.Logger.log_warn(
                    f"{self.model_name}: a batch of {len(members)} requests failed "
                    f"({type(failure).__name__}: {failure}); running them one by one"
                )
        for index, arrays in members:
            try:
                outputs = self._infer(arrays)
                tensors = [pb_utils.Tensor(name, output) for name, output in zip(self.output_names, outputs)]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as failure:  # to this request's client, and to the log
                responses[index] = self._internal("the runtime", failure)

    def _internal(self, where: str, failure: Exception):
        message = f"model '{self.model_name}': {where} failed: {type(failure).__name__}: {failure}"
        pb_utils.Logger.log_error(message)
        return _error(message, "INTERNAL")

    def finalize(self) -> None:
        self._infer = None
        self.session = None
