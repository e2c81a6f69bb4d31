"""``latentdiff serve``: AUTOMATIC1111's ``/sdapi/v1`` HTTP API and a web page, on FastAPI + uvicorn.

    latentdiff serve [--model PATH] [--port 7860] [--listen --api-auth USER:PASS] [--queue 16]

- :mod:`.config`: the server's settings and per-request limits;
- :mod:`.a1111`: A1111's request shapes (pydantic), their mapping onto generation options, and
  the ``info`` / ``parameters`` of a response;
- :mod:`.jobs`: the FIFO queue, one generation at a time, with progress, interrupt and skip;
- :mod:`.models`: the checkpoints, LoRAs and embeddings a client may name (only these names
  ever become paths);
- :mod:`.security`: loopback by default, basic auth, Host / Origin checks, a body cap;
- :mod:`.app`: the routes; ``static/`` the page.

Needs the ``server`` extra (``pip install latentdiff[server]``); the rest of latentdiff never
imports this package.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig"]
