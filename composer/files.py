"""Opening model files safely, and which files of a Hugging Face model are worth copying.

A base model directory is given by a user, so its entries may be FIFOs (``open`` blocks
forever), devices (``/dev/zero`` never ends) or huge sparse files. Every file the composer
reads is checked to be a regular file *before* it is opened, opened ``O_NONBLOCK`` (so a
FIFO swapped in after the check cannot block) and checked again on the open descriptor.
Small files (configs) are read with a size bound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

__all__ = ["HF_MODEL_FILES", "NotRegularFile", "is_model_file", "open_regular", "read_bounded"]

# What a full output copies from its base besides the weights: the files Hugging Face
# models carry for loading and for their users (config, generation config, tokenizers,
# chat templates, license and readme). An allow-list: anything else in the directory
# (a symlink named after a secret, a stray file) is never copied.
HF_MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.tiktoken",
        "chat_template.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "LICENSE",
        "LICENSE.txt",
        "LICENSE.md",
        "NOTICE",
        "USE_POLICY.md",
    }
)


def is_model_file(name: str) -> bool:
    """Whether a top-level file name is one of `HF_MODEL_FILES`."""
    return name in HF_MODEL_FILES


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or directory, not a regular file."""


def _refuse(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise NotRegularFile(errno.EINVAL, f"{Path(path).name} is {kind}")


def open_regular(path: Path | str, flags: int = os.O_RDONLY) -> int:
    """Open a regular file and return its descriptor (blocking mode restored).

    Raises:
        NotRegularFile: FIFOs, devices, sockets and directories, refused before opening
            (and again after, should the entry have been swapped in between).
        OSError: the file cannot be opened.
    """
    _refuse(Path(path), os.stat(path).st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _refuse(Path(path), os.fstat(fd).st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises:
        NotRegularFile: not a regular file. OSError (EFBIG): larger than ``max_bytes``.
    """
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(fd).st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{Path(path).name} is larger than {max_bytes} bytes")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"{Path(path).name} is larger than {max_bytes} bytes")
    return data
