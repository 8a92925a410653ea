"""How each API reports what a request used (kvmart/server/pipeline/usage.py). One place builds every `usage`
block, so the ledger (charges, receipts) extends `Usage` and these functions, not the endpoints.

OpenAI: `prompt_tokens` counts the whole prompt, `prompt_tokens_details.cached_tokens` the part read from cache
(always present, 0 without a hit, as OpenAI reports it); the Responses API says the same as `input_tokens` and
`input_tokens_details.cached_tokens`. Anthropic: `cache_read_input_tokens` counts the tokens read from cache,
`cache_creation_input_tokens` those computed and kept for later requests (every computed chunk is kept, unless the
request bypassed the cache), `input_tokens` the rest. Both carry `kvmart`: tokens by kind, where the cached ones
came from (documents, the caller's own prefix cache; RAM or the store), and the request's charge (what it paid, the
publishers' royalties, what it saved against re-prefilling, a signed receipt)."""

from __future__ import annotations

from kvmart.ledger import Charge, usd_text
from kvmart.server.pipeline.usage import Usage


def charge_json(charge: Charge | None) -> dict | None:
    """A charge as the response shows it: dollars as exact decimal strings, and the signed receipt."""
    if charge is None:
        return None
    q = charge.quote
    return {"usd": usd_text(q.total_nanousd), "cache_read_usd": usd_text(q.cache_read_nanousd),
            "computed_usd": usd_text(q.computed_nanousd), "output_usd": usd_text(q.output_nanousd),
            "royalty_usd": usd_text(q.royalty_nanousd), "provider_usd": usd_text(q.provider_nanousd),
            "saved_vs_prefill_usd": usd_text(q.saved_nanousd), "replayed": charge.replayed,
            "receipt": charge.receipt}


def kvmart_usage(u: Usage) -> dict:
    """kvmart's own accounting, added beside each API's standard fields."""
    return {
        "cached_tokens": u.cached_tokens, "computed_tokens": u.computed_tokens,
        "cache_creation_tokens": u.cache_creation_tokens, "cache": u.tier, "document": u.document_id,
        "cache_id": u.cache_id, "documents": [{"id": d.document_id, "cache_id": d.cache_id,
                                               "cached_tokens": d.cached_tokens} for d in u.documents],
        "own_cached_tokens": u.own_cached_tokens, "layout": u.layout or None,
        "load_seconds": round(u.load_seconds, 6), "prefill_seconds_saved": round(u.prefill_seconds_saved, 6),
        "tokens": {"cached": u.cached_tokens, "computed": u.computed_tokens, "output": u.completion_tokens},
        "metered": u.is_metered, "charge": charge_json(u.charge),
    }


def openai_usage(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
        "kvmart": kvmart_usage(u),
    }


def responses_usage(u: Usage) -> dict:
    """The Responses API's usage: `input_tokens` is the whole prompt, `cached_tokens` the part read from cache."""
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_creation_tokens},
        "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "kvmart": kvmart_usage(u),
    }


def anthropic_usage(u: Usage) -> dict:
    return {
        "input_tokens": u.computed_tokens - u.cache_creation_tokens, "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": u.cache_creation_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": u.cache_creation_tokens, "ephemeral_1h_input_tokens": 0},
        "kvmart": kvmart_usage(u),
    }
