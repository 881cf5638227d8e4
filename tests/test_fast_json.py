"""Answers written by orjson: the same JSON the standard library writes, and never a 500 on what
orjson refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flask import Flask, jsonify

from backend.web.fast_json import FastJSONProvider

pytestmark = pytest.mark.unit


@pytest.fixture
def app():
    app = Flask("t")
    app.json = FastJSONProvider(app)
    return app


def test_an_answer_parses_to_what_was_answered_in_compact_form(app):
    rle = np.random.default_rng(0).integers(0, 256, 200_000).tolist()
    answer = {"results": [{"result": [{"value": {"format": "rle", "rle": rle, "brushlabels": ["Défaut"]},
                                       "score": 0.5}], "model_version": "sam-vit_b"}]}
    with app.app_context():
        body = jsonify(answer).get_data()
    assert json.loads(body) == answer
    assert b", " not in body and b'": ' not in body  # compact: a 20 MP brush answer is megabytes
    assert list(json.loads(body)["results"][0]["result"][0]) == ["value", "score"]  # order kept


def test_numpy_values_are_written_as_numbers(app):
    with app.app_context():
        body = jsonify({"rle": np.arange(5, dtype=np.uint8), "score": np.float32(0.25)}).get_data()
    assert json.loads(body) == {"rle": [0, 1, 2, 3, 4], "score": 0.25}


@pytest.mark.parametrize("value", [{"error": "bad host \ud800"}, {1: "non-str key"}, {"n": 2 ** 70}])
def test_what_orjson_refuses_is_written_by_the_standard_library(app, value):
    with app.app_context():
        body = jsonify(value).get_data()
    assert json.loads(body) == json.loads(json.dumps(value))
