from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import ModuleType

import pytest

import layercode_agent.protocol as protocol
from layercode_agent.protocol import (
    InvalidPayloadError,
    LayercodeError,
    MalformedPayloadError,
    PayloadError,
    SignatureError,
)

PROTOCOL_DIR = Path(protocol.__file__).parent


def test_all_lists_every_public_name_once() -> None:
    names = protocol.__all__
    assert len(names) == len(set(names))
    public = {
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and not isinstance(value, ModuleType) and name != "annotations"
    }
    assert set(names) == public
    for name in names:
        assert getattr(protocol, name) is not None


@pytest.mark.parametrize("path", sorted(PROTOCOL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_imports_only_stdlib_and_pydantic(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside protocol/
                continue
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or top == "pydantic", f"{path.name} imports {module}"


def test_error_tree() -> None:
    assert issubclass(SignatureError, LayercodeError)
    assert issubclass(PayloadError, LayercodeError)
    assert issubclass(MalformedPayloadError, PayloadError)
    assert issubclass(InvalidPayloadError, PayloadError)
    assert not issubclass(SignatureError, PayloadError)
    assert (MalformedPayloadError.status_code, InvalidPayloadError.status_code) == (400, 422)


def test_signature_error_reason() -> None:
    exc = SignatureError("missing layercode-signature header")
    assert exc.reason == str(exc) == "missing layercode-signature header"


def test_invalid_payload_error_without_problems_lists_its_message() -> None:
    exc = InvalidPayloadError("type: field required")
    assert exc.problems == ("type: field required",)
    assert exc.status_code == 422
