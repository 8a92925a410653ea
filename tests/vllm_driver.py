"""Runs one vLLM engine (kvmart's `vllm` engine, connector included) in its own process for tests/test_vllm.py and
prints what it did as one JSON line. Each run is a fresh engine, so vLLM's in-memory prefix cache starts empty:
whatever a run reuses came from kvmart's store. Not a test module.

    python tests/vllm_driver.py '{"data_dir": ..., "model": ..., "publish": [[ids...]], "prompts": [[ids...]],
                                  "bypass": false, "prefix_caching": false, "max_tokens": 8, "logprobs": 5}'"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec: dict) -> dict:
    from kvmart.config import Settings
    from kvmart.engines.vllm import VllmEngine, VllmOptions

    settings = Settings(data_dir=Path(spec["data_dir"]), model=spec["model"], dtype=spec.get("dtype", "float32"))
    options = VllmOptions(prefix_caching=spec.get("prefix_caching", False), memory_fraction=0.3,
                          max_model_len=spec.get("max_model_len", 4096),
                          max_num_batched_tokens=spec.get("max_num_batched_tokens"))
    engine = VllmEngine.open(settings, options)
    try:
        published = [engine.publish(ids, title=f"doc{i}") for i, ids in enumerate(spec.get("publish", []))]
        answers = []
        for ids in spec.get("prompts", []):
            done = engine.complete(ids, spec.get("max_tokens", 8), bypass=spec.get("bypass", False),
                                   logprobs=spec.get("logprobs"))
            answers.append({"tokens": done.token_ids, "cached_tokens": done.cached_tokens, "tier": done.tier,
                            "document": done.document.cache_id if done.document else None,
                            "logprobs": done.logprobs})
        return {"fingerprint": engine.fingerprint.as_dict(), "digest": engine.fingerprint.digest,
                "block_size": engine.block_size,
                "published": [{"cache_id": p.entry.cache_id, "is_new": p.is_new, "num_tokens": p.entry.num_tokens}
                              for p in published],
                "answers": answers}
    finally:
        engine.close()


if __name__ == "__main__":  # vLLM spawns worker processes: they must not run this again
    result = main(json.loads(sys.argv[1]))
    print("KVMART-RESULT " + json.dumps(result), flush=True)
