"""The dependency direction of ARCHITECTURE.md, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layercode_agent"

# package -> project packages and third-party roots it must not import
FORBIDDEN: dict[str, set[str]] = {
    "protocol": {
        *("agent", "stores", "turns", "server", "cli", "client", "config"),
        *("fastapi", "starlette", "pydantic_ai"),
    },
    "agent": {"protocol", "stores", "turns", "server", "cli", "client", "config", "fastapi", "starlette"},
    "stores": {"protocol", "agent", "turns", "server", "cli", "client", "config", "fastapi", "starlette"},
    "history.py": {"protocol", "agent", "turns", "server", "cli", "client", "config", "fastapi", "starlette"},
    "turns": {"server", "cli", "fastapi", "starlette"},
    "conversations.py": {"server", "cli", "turns", "fastapi", "starlette"},
    # Metrics and spans sit beside the turn runner; the HTTP edge only mounts their exposition.
    "observability.py": {"server", "cli", "fastapi", "starlette"},
    "cli": {"fastapi", "starlette"},
    # Scenarios speak to any backend over HTTP, as Layercode does: never through this server's internals.
    "simulate.py": {
        *("server", "turns", "stores", "agent", "cli", "config", "conversations"),
        *("fastapi", "starlette", "pydantic_ai"),
    },
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    package_parts = path.relative_to(SRC).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                root = node.module.split(".")
                names.add(root[1] if root[0] == "layercode_agent" and len(root) > 1 else root[0])
            elif node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                target = [*base, *(node.module.split(".") if node.module else [])]
                if target:
                    names.add(target[0].removesuffix(".py"))
                else:
                    names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    files = [SRC / layer] if layer.endswith(".py") else sorted((SRC / layer).rglob("*.py"))
    assert files
    for path in files:
        bad = imported(path) & FORBIDDEN[layer]
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"
