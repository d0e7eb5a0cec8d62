"""The HTTP contract: request and response bodies, limits, and the one shape every error has.

Every error is `{"error": {"status", "code", "message", "details"?}}`: a client (or a
person reading logs) learns what was wrong without reading server code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

EXAMPLE_TEXTS = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]


class PredictRequest(BaseModel):
    """Either `texts` (a list) or `text` (one string), not both."""

    model_config = ConfigDict(
        extra="forbid",  # a typo such as "txt" must fail loudly, not predict nothing
        json_schema_extra={"examples": [{"texts": EXAMPLE_TEXTS}, {"text": EXAMPLE_TEXTS[0]}]},
    )

    texts: list[StrictStr] | None = Field(None, description="texts to classify, in order", min_length=1)
    text: StrictStr | None = Field(None, description="a single text to classify")

    @model_validator(mode="after")
    def _one_of(self) -> "PredictRequest":
        if (self.texts is None) == (self.text is None):
            raise ValueError('give exactly one of "texts" (a list of strings) or "text" (a string)')
        return self

    def all_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text]  # type: ignore[list-item]


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    score: float = Field(description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every class")
    model_name: str = Field(description="registered model that answered")
    model_version: str = Field(description="registered version that answered")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    run_id: str | None
    aliases: list[str]
    uri: str
    labels: list[str]
    max_length: int
    truncation: str
    test_metrics: dict[str, float]
    device: str
    loaded_at: float
    selector: str = Field(description="what the replica follows: models:/<name>@<alias> or models:/<name>/<version>")
    last_error: str | None = Field(None, description="why the last switch to another version failed (the model above still serves)")


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestError(Exception):
    """A client error the handlers turn into a JSON 4xx."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_payload(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


@dataclass(frozen=True)
class RequestLimits:
    max_texts: int
    max_text_chars: int
    max_body_bytes: int

    def check(self, texts: list[str], field: str = "texts") -> None:
        """Raise RequestError (422) naming the first text that breaks a limit (`field`: texts or text)."""
        if len(texts) > self.max_texts:
            raise RequestError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {self.max_texts}")
        for index, text in enumerate(texts):
            where = f"texts[{index}]" if field == "texts" else "text"
            if not text.strip():
                raise RequestError(422, "empty_text", f"{where} is empty (or only whitespace): nothing to classify")
            if len(text) > self.max_text_chars:
                raise RequestError(
                    422, "text_too_long", f"{where} has {len(text)} characters; the limit is {self.max_text_chars}"
                )
