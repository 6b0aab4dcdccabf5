"""REST API and web admin center (placeholder until the API work lands)."""

from __future__ import annotations

from typing import Any


async def start_api(service: Any, listen: str) -> Any:
    raise NotImplementedError
