"""Export a sentence-transformers model to an ONNX graph for `registry.search.embed.OnnxEmbedder`.

The graph takes the tokenizer's outputs and returns both views the retriever uses, already
pooled and normalised: ``sentence`` (the model's mean-pooled sentence embedding) and
``layer`` (mean-pooled hidden states of the intermediate layer). Beside it go the model's
own fast tokenizer (truncating at the model's ``max_seq_length``, padding to the longest
text) and ``meta.json``. Exporting imports torch once (about 10 s); afterwards a process
embeds without torch.

The export checks itself: the graph must reproduce torch's vectors on probe texts before
it is published. Publishing is a rename of a finished directory, so concurrent exporters
(the server and a build process) never see a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ServiceUnavailable

__all__ = ["ExportedModel", "ensure_exported", "onnx_encode", "open_exported"]

log = logging.getLogger(__name__)

_FORMAT = 1
_PROBES = [
    "translate customer emails from Romanian to English",
    "  Leading and trailing spaces, UPPER case, ünïcödé and emoji 🙂  ",
    "x",
    "a long input " * 200,  # beyond max_seq_length: truncation must match
]


@dataclass(frozen=True)
class ExportedModel:
    """Paths and facts of an exported model directory."""

    directory: Path
    dim: int
    inputs: tuple[str, ...]

    @property
    def graph(self) -> Path:
        return self.directory / "model.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"


def ensure_exported(model_path: Path, directory: Path, *, quantize: bool = False) -> ExportedModel:
    """The exported model in ``directory``, exporting ``model_path`` there first if needed."""
    exported = _read(directory)
    if exported is not None:
        return exported
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as exc:  # e.g. a read-only home holding the default (user) cache
        raise ServiceUnavailable(
            f"cannot write the exported embedding model to {directory.parent}: {exc.strerror or exc}; "
            "set BRICKYARD_EMBEDDING__CACHE_DIR to a writable directory"
        ) from None
    try:
        log.info("exporting embedding model %s to ONNX (once per model)", model_path)
        _export(model_path, staging, quantize=quantize)
        if directory.exists() and _read(directory) is None:  # an older format or a damaged copy
            shutil.move(directory, staging / "replaced")
        try:
            os.rename(staging, directory)
        except OSError:
            if _read(directory) is None:  # not a concurrent exporter's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    exported = _read(directory)
    assert exported is not None
    return exported


def _read(directory: Path) -> ExportedModel | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != _FORMAT:
        return None
    return ExportedModel(directory, int(meta["dim"]), tuple(meta["inputs"]))


def _export(model_path: Path, out: Path, *, quantize: bool) -> None:
    import numpy as np
    import torch

    from registry.search.torch_model import intermediate_layer, load_sentence_transformer, torch_encode

    model = load_sentence_transformer(model_path)
    _check_supported(model, model_path)
    transformer = model[0].auto_model.eval()
    layer = intermediate_layer(transformer.config.num_hidden_layers)
    hf_tokenizer = model.tokenizer
    inputs = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in hf_tokenizer.model_input_names)

    tokenizer = hf_tokenizer.backend_tokenizer
    tokenizer.enable_truncation(max_length=int(model.max_seq_length))
    tokenizer.enable_padding(pad_id=hf_tokenizer.pad_token_id, pad_token=hf_tokenizer.pad_token)
    tokenizer.save(str(out / "tokenizer.json"))

    want = torch_encode(model, layer, _PROBES)  # before exporting: tracing leaves the model changed
    sample = {n: torch.tensor(v) for n, v in hf_tokenizer(_PROBES[:2], padding=True).items() if n in inputs}
    graph = out / ("float.onnx" if quantize else "model.onnx")
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        torch.onnx.export(
            _pooled(transformer, layer, inputs),
            tuple(sample[n] for n in inputs),
            str(graph),
            input_names=list(inputs),
            output_names=["sentence", "layer"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in inputs},
            opset_version=17,
            dynamo=False,
        )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process, on the root logger
        try:
            quantize_dynamic(str(graph), str(out / "model.onnx"), per_channel=True, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        graph.unlink()
    dim = int(model.get_embedding_dimension())
    (out / "meta.json").write_text(
        json.dumps({"format": _FORMAT, "dim": dim, "layer": layer, "inputs": list(inputs), "quantized": quantize})
    )

    if not quantize:  # int8 vectors differ from float32 ones by design; float32 must match
        session, tokenizer, exported = open_exported(out, threads=1)
        have = onnx_encode(session, tokenizer, exported.inputs, _PROBES)
        for w, h in zip(want, have, strict=True):
            if not np.allclose(w, h, atol=1e-4):
                raise ServiceUnavailable(
                    f"the ONNX export of embedding model {model_path} does not reproduce its vectors "
                    f"(max difference {np.abs(w - h).max():.2g}); set BRICKYARD_EMBEDDING__RUNTIME=torch"
                )


def open_exported(directory: Path, *, threads: int) -> tuple[Any, Any, ExportedModel]:
    """An onnxruntime session and the tokenizer of an exported model."""
    import onnxruntime
    from tokenizers import Tokenizer

    exported = _read(directory)
    if exported is None:
        raise ServiceUnavailable(f"no exported embedding model in {directory}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning. Measured on this 2-CPU machine (shared,
    # load average 14-18), 2 threads, the 60 benchmark bricks' texts: spinning cost 146 ms of
    # CPU per brick against 82 ms without, and a one-line query 15.6 vs 7.8 ms of CPU (p50 55
    # vs 30 ms): a spinning thread burns the CPU the other requests and processes need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(exported.graph), options, providers=["CPUExecutionProvider"])
    return session, Tokenizer.from_file(str(exported.tokenizer)), exported


def onnx_encode(session: Any, tokenizer: Any, inputs: tuple[str, ...], texts: list[str]) -> tuple[Any, Any]:
    """Unit sentence vectors and unit layer vectors of ``texts`` from an exported model."""
    import numpy as np

    encodings = tokenizer.encode_batch(texts)
    columns = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    feeds = {name: np.array([getattr(e, columns[name]) for e in encodings], dtype=np.int64) for name in inputs}
    sentences, layers = session.run(["sentence", "layer"], feeds)
    return sentences, layers


def _check_supported(model: Any, model_path: Path) -> None:
    """Only transformer -> mean pooling (-> normalize) pipelines are exported."""
    names = [type(module).__name__ for module in model]
    pooling = model[1].get_config_dict() if len(model) > 1 else {}
    if (
        names[:2] != ["Transformer", "Pooling"]
        or pooling.get("pooling_mode") not in ("mean", None)
        or any(n != "Normalize" for n in names[2:])
    ):
        raise ServiceUnavailable(
            f"embedding model {model_path} ({' -> '.join(names)}) is not a mean-pooled transformer, which is "
            "all the ONNX runtime supports; set BRICKYARD_EMBEDDING__RUNTIME=torch"
        )


def _pooled(transformer: Any, layer: int, inputs: tuple[str, ...]) -> Any:
    """The transformer plus mean pooling of its last and its intermediate layer, as one module."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors: Any) -> tuple[Any, Any]:
            feeds = dict(zip(inputs, tensors, strict=True))
            out = self.transformer(**feeds, output_hidden_states=True)
            mask = feeds["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            count = mask.sum(1).clamp(min=1)
            sentence = (out.last_hidden_state * mask).sum(1) / count
            hidden = (out.hidden_states[layer] * mask).sum(1) / count
            normalize = torch.nn.functional.normalize
            return normalize(sentence, dim=1), normalize(hidden, dim=1)

    return Pooled()
