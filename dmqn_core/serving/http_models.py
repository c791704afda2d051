"""The request and response types of `dmqn serve`'s HTTP API (pydantic): they validate requests and
document the answers in the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dmqn_core.data.prepared import RAW_ID_RANGE

Int64 = Annotated[int, Field(strict=True, ge=RAW_ID_RANGE.start, le=RAW_ID_RANGE.stop - 1)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Int64 = Field(description="Raw user id, as in the log.")
    items: list[Int64] = Field(min_length=1, description="Raw candidate item ids (at most --max-items).")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[ScoreRequest] = Field(min_length=1, description="At most --max-users users.")


class ItemScore(BaseModel):
    item_id: int
    probability: float = Field(description="Click probability; a popularity score when source is popularity.")


class UserResult(BaseModel):
    user_id: int
    source: Literal["model", "popularity"] = Field(
        description="model: the user's cached state; popularity: no cached state, ?missing=popularity."
    )
    scores: list[ItemScore]
    unknown_items: list[int] = Field(
        description="Items not in the run's vocabulary, scored with the unknown-item (padding) embedding."
    )


class ScoreResponse(UserResult):
    run_id: str
    version: str = Field(description="The model version (run id + checkpoint hash) whose states were read.")


class BatchResponse(BaseModel):
    run_id: str
    version: str
    results: list[UserResult]


class ErrorResponse(BaseModel):
    error: str
    detail: str


class ReloadResponse(BaseModel):
    switched: bool
    version: str
    previous_version: str
    detail: str


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    run_id: str
    version: str
