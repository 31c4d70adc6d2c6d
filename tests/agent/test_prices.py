"""Pricing a response: a model genai-prices does not know is searched for once, a known one is still priced."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from genai_prices import data_snapshot, types
from pydantic_ai._genai_prices import best_effort_price  # pyright: ignore[reportPrivateUsage]
from pydantic_ai.usage import RequestUsage

from layercode_agent.agent._prices import remember_unpriced_models  # pyright: ignore[reportPrivateUsage]


@pytest.fixture
def remembering() -> Iterator[None]:
    earlier = data_snapshot._custom_snapshot  # pyright: ignore[reportPrivateUsage]
    data_snapshot.set_custom_snapshot(None)
    remember_unpriced_models()
    yield
    data_snapshot.set_custom_snapshot(earlier)


def test_an_unknown_model_is_searched_for_once(remembering: None, monkeypatch: pytest.MonkeyPatch) -> None:
    searches: list[str] = []
    find_model = types.Provider.find_model

    def counted(self: types.Provider, model_ref: str, **kwargs: object) -> types.ModelInfo | None:
        searches.append(model_ref)
        return find_model(self, model_ref, **kwargs)  # pyright: ignore[reportArgumentType]

    monkeypatch.setattr(types.Provider, "find_model", counted)
    usage = RequestUsage(input_tokens=100, output_tokens=20)
    for _ in range(3):
        assert best_effort_price(usage, model_name="my-local-llama", provider_name="openai") is None
    assert searches == ["my-local-llama"]
    price = best_effort_price(usage, model_name="gpt-4o-mini", provider_name="openai")
    assert price is not None and price.total_price > 0


def test_a_snapshot_the_process_chose_is_kept() -> None:
    earlier = data_snapshot._custom_snapshot  # pyright: ignore[reportPrivateUsage]
    own = data_snapshot.DataSnapshot(providers=data_snapshot.get_snapshot().providers, from_auto_update=False)
    data_snapshot.set_custom_snapshot(own)
    try:
        remember_unpriced_models()
        assert data_snapshot.get_snapshot() is own
    finally:
        data_snapshot.set_custom_snapshot(earlier)
