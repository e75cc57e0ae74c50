"""The API's request bodies: each field typed and bounded as `--mode=generate`'s flag of the same
name, unknown fields refused (so no request can name a server file: there is no field for
one). JSON bodies are read strictly (a string is not a number); multipart form fields, which
are all strings, are converted. The image travels beside these fields (m6_jax/serve/inputs.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_MAX = 2**31 - 1


def _not_blank(text: str) -> str:
  if not text.strip():
    raise ValueError("is empty; pass some text")
  return text


Text = Annotated[str, AfterValidator(_not_blank)]


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Decoding(_Body):
  """--mode=generate's decoding flags (docs/cli.md#generate)."""

  decoding: Literal["greedy", "beam", "sample", "ofa_caption"] = "greedy"
  max_len: int = Field(0, ge=0)
  beam_size: int = Field(4, ge=1, le=16)
  no_repeat_ngram_size: int = Field(0, ge=0, le=8)
  length_penalty: float = Field(0.6, ge=0.0, le=10.0)
  temperature: float = Field(1.0, ge=0.0, le=100.0)
  top_k: int = Field(0, ge=0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int = Field(0, ge=0, le=SEED_MAX)
  language: Literal["auto", "any", "en", "zh"] = "auto"


class Caption(Decoding):
  """POST /v1/caption: the image alone."""


class Answer(Decoding):
  """POST /v1/answer: the image and a question about it."""

  question: Text


class Continue(Decoding):
  """POST /v1/continue: a prompt (and optionally an image) whose continuation is generated."""

  prompt: Text


class Draw(_Body):
  """POST /v1/image: --mode=generate's drawing flags."""

  prompt: Text
  num_images: int = Field(4, ge=1)
  guidance_scale: float = Field(3.0, ge=0.0, le=100.0)
  rerank: int = Field(0, ge=0)
  temperature: float = Field(1.0, ge=0.0, le=100.0)
  top_k: int = Field(0, ge=0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int = Field(0, ge=0, le=SEED_MAX)

  @pydantic.model_validator(mode="after")
  def _rerank_keeps_enough(self) -> "Draw":
    if 0 < self.rerank < self.num_images:
      raise ValueError(
        f"rerank={self.rerank} must be 0 (no reranking) or at least num_images="
        f"{self.num_images}: the best num_images of that many candidates are kept"
      )
    return self


def one_line(error: pydantic.ValidationError) -> str:
  """A validation error in one line: `field: what is wrong` per error, joined by '; '."""
  parts = []
  for e in error.errors():
    where = ".".join(str(p) for p in e["loc"]) or "body"
    message = e["msg"].removeprefix("Value error, ")
    parts.append(f"{where}: {message}")
  return "; ".join(parts)


def parse(model: type[BaseModel], fields: dict[str, Any], form: bool = False) -> Any:
  """`model` of the request's fields (a form's strings converted); pydantic.ValidationError."""
  return model.model_validate(fields, strict=not form)
