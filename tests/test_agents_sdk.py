"""One turn of an OpenAI Agents SDK agent against `kvmart serve`, through POST /v1/responses (plain and streamed), on
the real SmolLM2-135M-Instruct (the seeded random models never end a turn, and the SDK treats a response cut by
max_output_tokens as a failure). The agent's instructions are the system prompt the document was published after,
so its prompt starts with the document's stored ids: read from cache, answered from it. Slow (the model is
converted once from its PyPI wheel), but .ci/run runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import agents
import pytest
from server_support import LiveServer

from kvmart.config import Settings
from kvmart.runtime.model import Model

pytestmark = pytest.mark.slow

MODEL = "builtin:smollm2-135m"
INSTRUCTIONS = "You are the office clerk. Answer from the handbook, in one short sentence."
HANDBOOK = ("Office handbook, week 12.\n\nThe on-call engineer this week is Priya Raman. She answers pages from "
            "9 am to 6 pm. The coffee machine on the third floor is broken until Friday; use the one on the "
            "second floor. Expense reports are due on the last working day of the month.")
QUESTION = "According to the handbook, who is the on-call engineer this week?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Model:
    root = tmp_path_factory.mktemp("agents-smollm2")
    local = os.environ.get("KVMART_TEST_GGUF")  # an already fetched GGUF skips the download (tests/test_smollm2.py)
    if local:
        (root / "models" / "gguf").mkdir(parents=True)
        shutil.copy(local, root / "models" / "gguf" / Path(local).name)
    return Model.load(Settings(data_dir=root, model=MODEL))


@pytest.fixture(scope="module")
def live(smollm2, tmp_path_factory):
    with LiveServer(smollm2, tmp_path_factory.mktemp("serve-agents")) as server:
        yield server


@pytest.fixture(scope="module")
def handbook(live) -> dict:
    response = live.publish(HANDBOOK, title="handbook", system=INSTRUCTIONS)
    assert response.status_code == 201, response.text
    return response.json()


def clerk(live, doc_id: str):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # the SDK would otherwise try to export traces to OpenAI
    client = AsyncOpenAI(base_url=live.url + "/v1", api_key=live.agent_key, max_retries=0)
    settings = agents.ModelSettings(temperature=0, max_tokens=64, extra_body={"documents": [doc_id]})
    return agents.Agent(name="clerk", instructions=INSTRUCTIONS, model_settings=settings,
                        model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client))


def test_one_agent_turn_reads_the_document_from_cache(live, handbook):
    result = asyncio.run(agents.Runner.run(clerk(live, handbook["id"]), QUESTION))
    assert "Priya" in result.final_output
    (response,) = result.raw_responses
    usage = response.usage
    assert usage.requests == 1 and usage.input_tokens_details.cached_tokens == handbook["num_tokens"]
    assert usage.input_tokens > handbook["num_tokens"] and usage.output_tokens > 0
    assert response.request_id.startswith("req_")  # the SDK read the request id header
    charges = live.http.get("/v1/usage", params={"limit": 1}).json()["charges"]
    assert charges[0]["receipt"]["tokens"]["cached"] == handbook["num_tokens"]


def test_a_streamed_agent_turn_gives_the_same_answer(live, handbook):
    async def turn() -> tuple[str, list[str]]:
        result = agents.Runner.run_streamed(clerk(live, handbook["id"]), QUESTION)
        pieces = [event.data.delta async for event in result.stream_events()
                  if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
        return result.final_output, pieces

    streamed, pieces = asyncio.run(turn())
    whole = asyncio.run(agents.Runner.run(clerk(live, handbook["id"]), QUESTION)).final_output
    assert len(pieces) > 1 and "".join(pieces) == streamed == whole
