"""Records that flow through the factory. One definition each; Arrow schemas derive from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """A question with a known answer and, when available, a gold reasoning trace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    problem_id: str = Field(description="stable, content-derived id")
    source: str
    question: str
    gold_answer: str = Field(description="canonical integer string, e.g. '38'")
    gold_steps: list[str] = Field(default_factory=list)
    num_steps: int = 0
