"""The server's settings: where it listens, who may call it, what it serves, per-request limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import BadArgument

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass
class ServeConfig:
    """Everything ``latentdiff serve`` is started with (the CLI flags, one field each)."""

    model: str | None = None  # a model folder or file; None: the built-in model
    host: str = LOOPBACK
    port: int = 7860
    listen: bool = False  # bind all interfaces (needs api_auth or insecure)
    insecure: bool = False  # allow listen without api_auth
    api_auth: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # HTTP basic credentials
    lora_dirs: list[Path] = dataclasses.field(default_factory=list)
    embeddings_dir: Path | None = None
    models_dir: Path | None = None
    tokenizer: str | None = None  # for single-file checkpoints in models_dir
    dtype: str = "auto"
    queue_size: int = 16  # jobs waiting (the running one not counted); more: 503
    max_body_bytes: int = 32 * 2**20  # request bodies over this: 413
    max_side: int = 2048  # width / height limit (pixels)
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)  # extra Host names besides the bind's

    def bind_host(self) -> str:
        return "0.0.0.0" if self.listen else self.host

    def validate(self) -> None:
        """Refuse settings that are unsafe or cannot work, naming the flag."""
        if self.listen and not self.api_auth and not self.insecure:
            raise BadArgument("--listen serves every network interface: give --api-auth USER:PASS "
                              "(or --insecure to serve without authentication)")
        if not 0 < self.port < 65536:
            raise BadArgument(f"--port must be in 1..65535, got {self.port}")
        if self.queue_size < 1:
            raise BadArgument(f"--queue must be >= 1, got {self.queue_size}")
        for folder, flag in [(d, "--lora-dir") for d in self.lora_dirs] + [
            (self.embeddings_dir, "--embeddings-dir"), (self.models_dir, "--models-dir")
        ]:
            if folder is not None and not Path(folder).is_dir():
                raise BadArgument(f"{flag} {folder} is not a folder")


def parse_api_auth(text: str) -> list[tuple[str, str]]:
    """A1111's ``--api-auth`` value: ``USER:PASS[,USER:PASS...]``."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise BadArgument(f"--api-auth takes USER:PASS[,USER:PASS], got {item.strip()!r}")
        pairs.append((user, password))
    return pairs
