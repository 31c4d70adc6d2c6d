from __future__ import annotations

import pytest
from pydantic_ai import models

# No test may reach a real LLM provider; tests use pydantic-ai's doubles or the local fakes.
models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
