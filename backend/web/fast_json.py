"""Answers serialised with orjson: a brush answer is a list of up to millions of small ints (a
ragged 1 MP mask is ~230,000 RLE bytes, a 20 MP one several MB), which the standard library
writes ~10x slower; on a shared CPU that time is taken from every other annotator's click.

Requests are still parsed by the standard library: bodies are small, and its RecursionError on a
hostile nesting depth is what `json_body` maps to a 400."""

from __future__ import annotations

import typing

import orjson
from flask.json.provider import DefaultJSONProvider


class FastJSONProvider(DefaultJSONProvider):
    sort_keys = False
    compact = True

    def dumps(self, obj: typing.Any, **kwargs: typing.Any) -> str:
        try:
            return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        except (TypeError, orjson.JSONEncodeError):
            # what orjson refuses and the standard library writes: a lone surrogate echoed from a
            # hostile request in an error message, non-str keys, ints beyond 64 bits
            return super().dumps(obj, **kwargs)
