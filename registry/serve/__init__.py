"""OpenAI-compatible serving: the gateway from a ``model`` string to generated text.

This room owns what happens between ``POST /v1/chat/completions`` and an engine's tokens:

- `registry.serve.modelref`: the ``model`` grammar (base, brick[@version], composition id,
  ``auto[:base]``), parsed without I/O;
- `registry.serve.routing`: turns a parsed reference into a `Target` (base model, adapter,
  what was used), searching and composing for ``auto`` through the service's compositions;
- `registry.serve.protocol`: the OpenAI request bodies and the ``brickyard`` options;
- `registry.serve.engine`: the engine interface, the embedded transformers + PEFT engine
  (`registry.serve.embedded`, whose child is `registry.serve.worker`) and the vLLM forwarder
  (`registry.serve.vllm`), chosen by ``serve.engine``;
- `registry.serve.gateway`: routing + engine + the OpenAI response shapes.

It talks to the rest through `Registry` (catalog, search, compositions); routes live in
`registry.api.routes.openai`.
"""

from registry.serve.gateway import Gateway
from registry.serve.modelref import ModelRef, parse_model

__all__ = ["Gateway", "ModelRef", "parse_model"]
