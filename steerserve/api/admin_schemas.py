"""The admin API's request bodies (see ``schemas`` for the conventions: strict types, constraints that do
not depend on the loaded model, lone surrogates refused, every rule stated in the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from steerserve.api.schemas import WHOLE, BodyModel, Description, Layer, Name, StrictModel, Text


class VectorUpload(StrictModel, BodyModel):
    name: Name
    description: Description = ""
    vectors: dict[str, list[float]] = Field(description='{"<layer>": [hidden_size floats]}',
                                            json_schema_extra={"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"},
                                                               "minProperties": 1})


class ComputeVector(StrictModel, BodyModel):
    name: Name
    positive: Annotated[list[Text], Field(min_length=1)]
    negative: Annotated[list[Text], Field(min_length=1)]
    layers: Annotated[list[Layer], Field(min_length=1)] | None = None  # None: every layer
    description: Description = ""
    pooling: Literal["mean", "last"] = "mean"  # mean over each prompt's tokens, or its last token
    chat: bool = False  # render each prompt as a user message with the chat template


class EnableVector(StrictModel, BodyModel):
    enabled: bool
    version: Annotated[int, Field(ge=1), WHOLE] | None = None


class PairCreate(StrictModel, BodyModel):
    name: Name
    positive: Text
    negative: Text
    layer: Layer | None = None
    coeff: Annotated[float, Field(allow_inf_nan=False)] | None = None
    description: Description = ""
