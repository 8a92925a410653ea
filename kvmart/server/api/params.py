"""Sampling parameters and fields shared by the generation APIs (OpenAI's and Anthropic's), validated at the edge:
a value the model cannot honour as sent is a 400 naming the parameter, never a 500 from deep inside sampling.

- temperature: 0 (greedy) or at least MIN_TEMPERATURE. Below that, sampling is greedy to within float precision
  (a logit gap of 0.01 at temperature 0.001 is a probability ratio of e^-10), so kvmart asks for 0 instead of
  pretending to sample (`temperature: 1e-300` made logits/temperature overflow).
- top_p: at least MIN_TOP_P (a smaller nucleus holds only the most likely token: greedy again).
- seed: what the generator takes, -2**63 .. 2**64-1 (`seed: 2**70` overflowed it).
- salt: refused. A cache's tenant salt is the server's, from the authenticated account (docs/SECURITY.md); a
  client sending one would believe it isolates something, and it would not.

The sampler itself (kvmart/runtime/model.py `choose_token`) is safe for any value too; these are the API's
contract, stated where a client can read it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

MIN_TEMPERATURE = 0.001
MIN_TOP_P = 0.001
SEED_RANGE = (-(2**63), 2**64 - 1)


def _temperature(value: float | None) -> float | None:
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; smaller values sample greedily "
                         "anyway: send 0")
    return value


def _top_p(value: float | None) -> float | None:
    if value is not None and value < MIN_TOP_P:
        raise ValueError(f"must be at least {MIN_TOP_P}; a smaller nucleus holds only the most likely token "
                         "(send temperature 0 for greedy decoding)")
    return value


OpenAITemperature = Annotated[float | None, Field(None, ge=0, le=2), AfterValidator(_temperature)]
AnthropicTemperature = Annotated[float | None, Field(None, ge=0, le=1), AfterValidator(_temperature)]
TopP = Annotated[float | None, Field(None, gt=0, le=1), AfterValidator(_top_p)]
Seed = Annotated[int | None, Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])]


class NoClientSalt(BaseModel):
    """A request model that refuses a client's `salt` (see the module's docstring)."""

    salt: Any = None

    @field_validator("salt")
    @classmethod
    def _refuse(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("refused: a cache's salt is set by the server from the authenticated account, never by "
                             "a client (leave it out)")
        return None
