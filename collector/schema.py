"""The ingest body (docs/measurement.md and docs/ingest.md), validated strictly.

Built from the probe's own vocabularies (probe.model), so an outcome or transport the
probe cannot produce is rejected here too, and bounded by probe.limits, the numbers the
probe clamps what a resolver sent to: a measurement the probe makes is never refused
for its size. Unknown keys inside a measurement are allowed (the contract may be
extended by newer probes); wrong types are not.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from probe.limits import (
    MAX_ANSWER_CHARS,
    MAX_ANSWERS,
    MAX_BATCH_MEASUREMENTS,
    MAX_CNAME,
    MAX_EDE,
    MAX_EDE_TEXT,
    MAX_ERROR_CHARS,
    MAX_JSON_DEPTH,
    MAX_LABEL_CHARS,
    MAX_NAME_CHARS,
    MAX_WIRE_B64,
)
from probe.model import Expectation, Finding, Outcome, Transport

__all__ = ["MAX_BODY_DEPTH", "Batch", "MeasurementIn", "ProbeIdentity"]

# The body's own levels (batch → measurements → a measurement → its key) above the free-form
# JSON a measurement may carry, which probe.limits bounds at MAX_JSON_DEPTH.
MAX_BODY_DEPTH = MAX_JSON_DEPTH + 4

Name = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9_.-]+$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]


class EdeIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: int = Field(ge=0, le=65535)
    text: str = Field(max_length=MAX_EDE_TEXT)


class MeasurementIn(BaseModel):
    """One measurement; the required keys of docs/measurement.md, typed."""

    model_config = ConfigDict(extra="allow")

    domain: Name
    qtype: Annotated[str, StringConstraints(pattern=r"^(A|AAAA|HTTPS)$")]
    resolver: Label
    transport: Transport
    outcome: Outcome
    blocked: bool | None
    expected: Expectation | None
    finding: Finding | None
    rcode: Annotated[str, StringConstraints(max_length=16)] | None
    ede: list[EdeIn] = Field(max_length=MAX_EDE)
    answers: list[Annotated[str, StringConstraints(max_length=MAX_ANSWER_CHARS)]] = Field(
        max_length=MAX_ANSWERS
    )
    cname: list[Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]] = Field(max_length=MAX_CNAME)
    sinkhole: dict[str, str] | None
    control: dict[str, Any] | None
    latency_ms: float | None = Field(ge=0)
    time: Annotated[str, StringConstraints(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")]
    error: Annotated[str, StringConstraints(max_length=MAX_ERROR_CHARS)] | None
    wire: Annotated[str, StringConstraints(max_length=MAX_WIRE_B64, pattern=r"^[A-Za-z0-9+/=]*$")] | None


class ProbeIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    region: Label
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
    version: Annotated[str, StringConstraints(max_length=64)] | None = None


class Batch(BaseModel):
    """What a probe POSTs to /api/v1/results."""

    model_config = ConfigDict(extra="forbid")
    probe: ProbeIdentity
    batch_id: Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
    sent_at: float | None = None
    measurements: list[MeasurementIn] = Field(max_length=MAX_BATCH_MEASUREMENTS)
