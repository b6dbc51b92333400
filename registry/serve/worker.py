"""The embedded engine's child process: transformers + PEFT generation, streamed as JSON lines.

Run as ``python -m registry.serve.worker`` by `registry.serve.embedded.EmbeddedEngine`. Each
base model is loaded once; adapters are attached with PEFT's ``load_adapter`` and switched with
``set_adapter`` per request, at most ``max_loaded_adapters`` kept (least recently used evicted);
the base alone runs under ``disable_adapter()``. Requests are served one at a time in arrival
order (FIFO: fair, and the two cores are better spent on one generation than split).

Protocol (one JSON object per line). In: ``{"op": "generate", "id", ...}``, ``{"op": "cancel",
"id"}``, ``{"op": "status", "id"}``, ``{"op": "forget", "keys"}`` (unload adapters). Out, tagged
with the request id: ``start`` (prompt tokens), ``token`` (choice index, text), ``done`` (index,
finish reason, tokens), ``error`` (status, code, message), ``status``. A cancel stops the
generation at the next token. End of input: the server went away, the child exits.

A request with ``"stream": false`` gets its text in one ``token`` line per choice, just before
``done``: a line per token costs the server a pipe read, a JSON parse and an event-loop wake-up
for nothing its client sees, and without stop strings the text is decoded once, at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from typing import IO, Any

__all__ = ["main"]


class _Bad(Exception):
    """A request the model cannot serve (answered as a 4xx)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class _Base:
    """A loaded base model, its tokenizer and its attached adapters (LRU order)."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model: Any = model.eval()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.adapters: OrderedDict[str, str] = OrderedDict()
        self.active: str | None = None  # the adapter set_adapter last made active

    def use(self, key: str | None, path: str | None, limit: int) -> Any:
        """Make ``key`` the active adapter (loading it, evicting the least recently used);
        the context manager the generation runs in."""
        from peft import PeftModel

        if key is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()
        if key in self.adapters:
            self.adapters.move_to_end(key)
            if key == self.active:  # set_adapter walks every module: not again per request
                return contextlib.nullcontext()
        elif isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=key)
            self.adapters[key] = str(path)
        else:
            peft_model: Any = PeftModel.from_pretrained(self.model, str(path), adapter_name=key)
            self.model = peft_model.eval()
            self.adapters[key] = str(path)
        while len(self.adapters) > limit:  # the least recently used: never ``key``, just moved last
            old, _ = self.adapters.popitem(last=False)
            self.model.delete_adapter(old)
        self.model.set_adapter(key)
        self.active = key
        return contextlib.nullcontext()

    def forget(self, keys: list[str]) -> None:
        """Unload the adapters named ``keys`` (a deleted brick)."""
        for key in keys:
            if self.adapters.pop(key, None) is not None:
                self.model.delete_adapter(key)
                if key == self.active:
                    self.active = None


class _Worker:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.write_lock = threading.Lock()
        self.bases: dict[str, _Base] = {}
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[int] = set()
        self.limit = 8
        self.stopped_early: list[dict[str, int]] = []  # the last cancelled generations (id, tokens made)

    def send(self, message: dict[str, Any]) -> None:
        with self.write_lock:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()

    def read(self, stream: IO[str]) -> None:
        for line in stream:
            message = json.loads(line)
            if message.get("op") == "cancel":
                self.cancelled.add(int(message["id"]))
            else:
                self.jobs.put(message)
        self.jobs.put(None)

    def run(self) -> None:
        import torch

        while (job := self.jobs.get()) is not None:
            rid = int(job["id"])
            try:
                if job["op"] == "config":
                    self.limit = int(job["max_loaded_adapters"])
                    if job.get("threads"):  # serve.threads (registry.serve.embedded.engine_threads)
                        torch.set_num_threads(int(job["threads"]))
                    self.send({"id": rid, "event": "status", "pid": os.getpid()})
                elif job["op"] == "forget":
                    for base in self.bases.values():
                        base.forget(job["keys"])
                elif job["op"] == "status":
                    loaded = {path: list(base.adapters) for path, base in self.bases.items()}
                    self.send({"id": rid, "event": "status", "bases": loaded, "pid": os.getpid(),
                               "cancelled": self.stopped_early, "threads": torch.get_num_threads()})  # fmt: skip
                elif rid in self.cancelled:
                    self.send({"id": rid, "event": "done", "index": 0, "finish_reason": "cancelled", "tokens": 0})
                else:
                    self.generate(job)
            except _Bad as exc:
                self.send({"id": rid, "event": "error", "status": 400, "code": exc.code, "param": exc.param,
                           "message": str(exc)})  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - the request fails, the child lives on
                self.send({"id": rid, "event": "error", "status": 500, "code": "engine_error", "param": None,
                           "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            finally:
                self.cancelled.discard(rid)

    def generate(self, job: dict[str, Any]) -> None:
        import torch

        rid = int(job["id"])
        base = self.bases.get(job["base"])
        if base is None:
            base = self.bases[job["base"]] = _Base(job["base"])
        ids = self.prompt_ids(base, job)
        max_tokens = job.get("max_tokens") or base.max_len - len(ids)
        if len(ids) >= base.max_len or len(ids) + max_tokens > base.max_len:
            raise _Bad(
                "context_length_exceeded",
                f"This model's maximum context length is {base.max_len} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion).",
                "messages" if job.get("messages") else "prompt",
            )
        adapter = job.get("adapter")
        context = base.use(job.get("adapter_key"), adapter, self.limit)
        self.send({"id": rid, "event": "start", "prompt_tokens": len(ids)})
        tensor = torch.tensor([ids])
        for index in range(int(job.get("n", 1))):
            if job.get("seed") is not None:
                torch.manual_seed(int(job["seed"]) + index)
            streamer = _Streamer(
                self, rid, index, base.tokenizer, list(job.get("stop") or []), stream=bool(job.get("stream", True))
            )
            sampling: dict[str, Any] = {"do_sample": False}
            if float(job.get("temperature", 1.0)) > 0:
                sampling = {"do_sample": True, "temperature": float(job["temperature"]), "top_p": float(job["top_p"]),
                            "top_k": 0}  # fmt: skip
            eos = base.model.config.eos_token_id
            with context, torch.no_grad():
                base.model.generate(
                    input_ids=tensor,
                    attention_mask=torch.ones_like(tensor),
                    max_new_tokens=max_tokens,
                    streamer=streamer,
                    stopping_criteria=[streamer.criterion],
                    pad_token_id=eos if isinstance(eos, int) else None,
                    **sampling,
                )
            if index + 1 < int(job.get("n", 1)):  # a context manager is one-shot
                context = base.use(job.get("adapter_key"), adapter, self.limit)
            reason = "cancelled" if streamer.cancelled else streamer.reason(max_tokens, eos)
            self.send({"id": rid, "event": "done", "index": index, "finish_reason": reason,
                       "tokens": len(streamer.generated)})  # fmt: skip
            if streamer.cancelled:
                self.stopped_early = [*self.stopped_early[-15:], {"id": rid, "tokens": len(streamer.generated)}]
                return

    @staticmethod
    def prompt_ids(base: _Base, job: dict[str, Any]) -> list[int]:
        from registry.serve.chat import render_plain_chat

        tokenizer = base.tokenizer
        if job.get("messages") is not None:
            if getattr(tokenizer, "chat_template", None):
                encoded = tokenizer.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=True)
                return list(encoded["input_ids"] if isinstance(encoded, dict) else encoded)
            return list(tokenizer(render_plain_chat(job["messages"]))["input_ids"])
        prompt = job["prompt"]
        if isinstance(prompt, list):
            vocab = int(base.model.config.vocab_size)
            if any(not 0 <= int(t) < vocab for t in prompt):
                raise _Bad("invalid_prompt", f"prompt token ids must be in [0, {vocab})", "prompt")
            return [int(t) for t in prompt]
        return list(tokenizer(prompt)["input_ids"])


class _Streamer:
    """transformers' streamer interface: sends each new piece of text; stops on a stop string or a cancel."""

    def __init__(
        self, worker: _Worker, rid: int, index: int, tokenizer: Any, stops: list[str], *, stream: bool = True
    ) -> None:
        self.worker, self.rid, self.index, self.tokenizer, self.stops = worker, rid, index, tokenizer, stops
        self.stream = stream  # False: the text is sent once, by end()
        self.generated: list[int] = []
        self.text = ""
        self.sent = 0  # how much of ``text`` was sent
        self.prompt_seen = False
        self.stopped = False
        self.cancelled = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.generated.extend(int(t) for t in value.reshape(-1).tolist())
        if self.stream or self.stops:  # stop strings are looked for as the text grows
            self._emit(final=False)

    def _emit(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a character split across tokens: wait for the rest
            return
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stream:
            self._send()

    def _send(self) -> None:
        new = self.text[self.sent :]
        self.sent = len(self.text)
        if new:
            self.worker.send({"id": self.rid, "event": "token", "index": self.index, "text": new})

    def end(self) -> None:
        """transformers calls this when generation ends: send what was held back."""
        if self.prompt_seen and not self.stopped:
            self._emit(final=True)
        self._send()

    def criterion(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.cancelled = self.rid in self.worker.cancelled
        return torch.full((input_ids.shape[0],), self.stopped or self.cancelled, dtype=torch.bool)

    def reason(self, max_tokens: int, eos: Any) -> str:
        if self.stopped:
            return "stop"
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if self.generated and self.generated[-1] in eos_ids:
            return "stop"
        return "length" if len(self.generated) >= max_tokens else "stop"


def main() -> int:
    """Serve requests from stdin until it closes."""
    sys.stdout.reconfigure(line_buffering=False)  # type: ignore[union-attr]
    worker = _Worker(sys.stdout)
    threading.Thread(target=worker.read, args=(sys.stdin,), name="serve-reader", daemon=True).start()
    started = time.monotonic()
    worker.run()
    print(f"serve worker exits after {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
