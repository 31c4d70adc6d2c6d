"""Price lookups that remember the models genai-prices does not know.

pydantic-ai prices every model response with genai-prices (`fill_response_cost`). genai-prices keeps
the models it finds, but not a miss: a model it does not know (a local server's, most OpenAI-compatible
hosts') is searched for again, through every model of the provider, on every response: measured
(`timeit`, pydantic-ai's `best_effort_price` for the bench's model "bench"), 60 µs a lookup, and 5 µs
with this snapshot, which remembers misses as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from genai_prices import data_snapshot, types
from genai_prices.data_snapshot import DataSnapshot, get_snapshot, set_custom_snapshot

__all__ = ["remember_unpriced_models"]

_MISSES_KEPT = 1024
"""Model lookups a process remembers as unknown, at most (a bound against model names that vary)."""


@dataclass
class _RememberingSnapshot(DataSnapshot):
    _model_misses: set[tuple[str, str | None, str | None, str | None]] = field(default_factory=set, init=False)

    def find_provider_model(
        self,
        model_ref: str,
        provider: types.Provider | None,
        provider_id: str | None,
        provider_api_url: str | None,
    ) -> tuple[types.Provider, types.ModelInfo]:
        key = (model_ref.lower(), provider.id if provider is not None else None, provider_id, provider_api_url)
        if key in self._model_misses:
            raise LookupError(f"Unable to find model with {model_ref=!r}")
        try:
            return super().find_provider_model(model_ref, provider, provider_id, provider_api_url)
        except LookupError:
            if len(self._model_misses) < _MISSES_KEPT:
                self._model_misses.add(key)
            raise


def remember_unpriced_models() -> None:
    """Price with a snapshot that remembers misses, unless the process chose a snapshot of its own already."""
    if getattr(data_snapshot, "_custom_snapshot", None) is not None:
        return  # Set by the application, or by genai-prices' own updater: theirs to keep.
    bundled = get_snapshot()
    set_custom_snapshot(_RememberingSnapshot(providers=bundled.providers, from_auto_update=bundled.from_auto_update))
