"""Arrow schemas derived from the pydantic records: the records are the one definition of every column."""

from __future__ import annotations

import types
from typing import Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel

PRIMITIVES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def arrow_type(annotation) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) for a field annotation: primitives, list[...], Optional[...], nested models."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) != 1 or len(args) != 2:
            raise TypeError(f"only Optional[X] unions map to Arrow, got {annotation}")
        return arrow_type(present[0])[0], True
    if get_origin(annotation) is list:
        item, item_nullable = arrow_type(args[0])
        return pa.list_(pa.field("item", item, nullable=item_nullable)), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation))), False
    if annotation in PRIMITIVES:
        return PRIMITIVES[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema([pa.field(name, *arrow_type(field.annotation)) for name, field in model.model_fields.items()])


def to_table(rows: list[BaseModel], model: type[BaseModel]) -> pa.Table:
    return pa.Table.from_pylist([row.model_dump() for row in rows], schema=arrow_schema(model))


def from_table(table: pa.Table, model: type[BaseModel]) -> list[BaseModel]:
    return [model.model_validate(row) for row in table.to_pylist()]
