"""The shadow document's rules (agent.shadow.document), pure: merge, null, version, limits, delta."""

from __future__ import annotations

import json

import pytest

from agent.config.tree import flatten, unflatten
from agent.shadow.document import (
    MAX_STATE_BYTES,
    Accepted,
    BadRequest,
    DesiredInvalid,
    Rejected,
    ShadowDocument,
    UpdateRequest,
    apply_update,
    delta,
    handle_update,
    merge,
    parse_get,
    parse_update,
    set_reported,
)


def accept_all(merged, touched):
    return merged


def update(doc, payload, validate=accept_all, now=100.0):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return handle_update(doc, raw, validate, now)


def test_partial_desired_is_merged_and_version_counts_accepted_updates():
    doc = ShadowDocument()
    r = update(doc, {"state": {"desired": {"engine": {"n_ctx": 512}}}})
    assert isinstance(r, Accepted) and r.document.version == 1
    r = update(r.document, {"state": {"desired": {"engine": {"n_batch": 64}, "intake": {"paused": True}}}}, now=200.0)
    assert isinstance(r, Accepted) and r.document.version == 2
    assert r.document.desired == {"engine": {"n_ctx": 512, "n_batch": 64}, "intake": {"paused": True}}
    assert r.document.desired_meta == {"engine.n_ctx": 100.0, "engine.n_batch": 200.0, "intake.paused": 200.0}
    assert r.changed == {"engine.n_batch", "intake.paused"}


def test_null_removes_a_key_and_an_emptied_section_and_desired_null_removes_all():
    doc = ShadowDocument(
        version=3,
        desired={"engine": {"n_ctx": 512}, "intake": {"paused": True}},
        desired_meta={"engine.n_ctx": 1.0, "intake.paused": 1.0},
    )
    r = update(doc, {"state": {"desired": {"engine": {"n_ctx": None}}}})
    assert isinstance(r, Accepted)
    assert r.document.desired == {"intake": {"paused": True}} and r.document.version == 4
    assert r.document.desired_meta == {"intake.paused": 1.0}
    r = update(r.document, {"state": {"desired": None}})
    assert isinstance(r, Accepted) and r.document.desired == {} and r.document.desired_meta == {}
    assert r.changed == {"intake.paused"}


def test_two_writers_without_version_both_survive():
    doc = ShadowDocument()
    a = update(doc, {"state": {"desired": {"engine": {"n_ctx": 512}}}, "client_token": "alice"})
    b = update(a.document, {"state": {"desired": {"telemetry": {"interval_s": 5}}}, "client_token": "bob"})
    assert isinstance(b, Accepted) and b.client_token == "bob"
    assert b.document.desired == {"engine": {"n_ctx": 512}, "telemetry": {"interval_s": 5}}


def test_stale_version_is_409_and_changes_nothing():
    doc = ShadowDocument(version=7, desired={"engine": {"n_ctx": 512}})
    r = update(doc, {"state": {"desired": {"engine": {"n_ctx": 1024}}}, "version": 6, "client_token": "t1"})
    assert isinstance(r, Rejected) and r.code == 409 and r.version == 7 and r.client_token == "t1"
    assert "version 6" in r.message and "version 7" in r.message
    ok = update(doc, {"state": {"desired": {"engine": {"n_ctx": 1024}}}, "version": 7})
    assert isinstance(ok, Accepted) and ok.document.version == 8


def test_state_over_8_kb_is_413_counting_reported_too():
    reported = {"board": {"note": "r" * 3000}}
    doc = ShadowDocument(version=1, reported=reported)
    big = {"model": {"path": "x" * 9 * 1024}}
    r = update(doc, {"state": {"desired": big}})
    assert isinstance(r, Rejected) and r.code == 413 and "more than 8192" in r.message
    # desired alone fits, but not with reported:
    fits_alone = {"model": {"path": "x" * 6000}}
    assert update(ShadowDocument(), {"state": {"desired": fits_alone}}).document.version == 1
    r = update(doc, {"state": {"desired": fits_alone}})
    assert isinstance(r, Rejected) and r.code == 413


def test_huge_payload_is_413_unparsed():
    r = update(ShadowDocument(), b'{"state": {"desired": {"model": {"path": "' + b"x" * 70000 + b'"}}}}')
    assert isinstance(r, Rejected) and r.code == 413 and "payload is" in r.message


def test_nesting_deeper_than_6_is_400_naming_the_path():
    deep: dict = {"v": 1}
    for name in "fedcba":
        deep = {name: deep}
    r = update(ShadowDocument(), {"state": {"desired": deep}})  # a.b.c.d.e.f.v: 7 levels
    assert isinstance(r, Rejected) and r.code == 400
    assert r.errors == {"a.b.c.d.e.f.v": "nested 7 levels deep, more than 6"}
    six = deep["a"]
    assert isinstance(update(ShadowDocument(), {"state": {"desired": six}}), Accepted)


@pytest.mark.parametrize(
    "payload, key, text",
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid UTF-8"),
        (b"[1, 2]", None, "must be a JSON object, got an array"),
        (b'{"state": {"desired": {"engine": {"n_ctx": NaN}}}}', None, "NaN"),
        (
            b'{"state": {"desired": {"engine": {"n_ctx": 1, "n_ctx": 2}}}}',
            "state.desired.engine.n_ctx",
            "more than once",
        ),
        (b'{"desired": {}}', "desired", "unknown key"),
        (b'{"state": 5}', "state", "must be an object"),
        (b'{"state": {}}', "state.desired", "missing"),
        (b'{"state": {"desired": {}}}', "state.desired", "is empty"),
        (b'{"state": {"desired": 3}}', "state.desired", "must be an object or null"),
        (b'{"state": {"desired": {"a": 1}, "reported": {"a": 1}}}', "state.reported", "device only"),
        (b'{"state": {"desired": {"a": 1}}, "version": "3"}', "version", "non-negative integer"),
        (b'{"state": {"desired": {"a": 1}}, "version": true}', "version", "non-negative integer"),
        (b'{"state": {"desired": {"a": 1}}, "version": -1}', "version", "non-negative integer"),
        (b'{"state": {"desired": {"a": 1}}, "client_token": 5}', "client_token", "must be a string"),
    ],
)
def test_unreadable_updates_get_a_precise_400(payload, key, text):
    r = update(ShadowDocument(version=2), payload)
    assert isinstance(r, Rejected) and r.code == 400 and r.version == 2
    if key is None:
        assert text in r.message
    else:
        assert text in r.errors[key], r.errors
        assert key in r.message


def test_client_token_is_limited_to_64_bytes_and_echoed_otherwise():
    ok = "é" * 32  # 64 bytes
    r = update(ShadowDocument(), {"state": {"desired": {"a": 1}}, "client_token": ok})
    assert isinstance(r, Accepted) and r.client_token == ok
    r = update(ShadowDocument(), {"state": {"desired": {"a": 1}}, "client_token": ok + "x"})
    assert isinstance(r, Rejected) and r.errors == {"client_token": "is 65 UTF-8 bytes, more than 64"}
    # A readable token is echoed even when the rest is refused.
    r = update(ShadowDocument(), {"state": {"desired": {}}, "client_token": "mine"})
    assert isinstance(r, Rejected) and r.client_token == "mine"


def test_a_400_from_the_validator_changes_nothing_and_lists_every_key():
    def validate(merged, touched):
        assert touched == {"engine.n_ctx", "intake.paused"}
        raise DesiredInvalid({"engine.n_ctx": "bad", "intake.paused": "worse"})

    doc = ShadowDocument(version=4, desired={"telemetry": {"interval_s": 5}})
    r = apply_update(doc, UpdateRequest({"engine": {"n_ctx": -1}, "intake": {"paused": "x"}}), validate, 1.0)
    assert isinstance(r, Rejected) and r.code == 400 and r.version == 4
    assert r.errors == {"engine.n_ctx": "bad", "intake.paused": "worse"}
    assert "engine.n_ctx: bad" in r.message and "nothing changed" in r.message
    assert doc.desired == {"telemetry": {"interval_s": 5}}


def test_the_validator_sees_the_merged_state_and_its_normalised_form_is_kept():
    seen = {}

    def validate(merged, touched):
        seen.update(merged=merged, touched=touched)
        return {"model": {"path": "a.gguf"}, "engine": {"n_ctx": 512}}

    doc = ShadowDocument(version=1, desired={"engine": {"n_ctx": 512}})
    r = apply_update(doc, UpdateRequest({"model": {"path": "./a.gguf"}}), validate, 5.0)
    assert seen == {"merged": {"engine": {"n_ctx": 512}, "model": {"path": "./a.gguf"}}, "touched": {"model.path"}}
    assert r.document.desired == {"model": {"path": "a.gguf"}, "engine": {"n_ctx": 512}}


def test_delta_is_desired_keys_that_differ_from_reported():
    desired = {"engine": {"n_ctx": 512, "n_batch": 64}, "intake": {"paused": True}, "telemetry": {"interval_s": 30}}
    reported = {
        "engine": {"n_ctx": 512, "n_batch": 128},
        "intake": {"paused": 1},
        "telemetry": {"interval_s": 30.0},
        "errors": {"engine.n_batch": "x"},
    }
    assert delta(desired, reported) == {"engine": {"n_batch": 64}, "intake": {"paused": True}}
    assert delta({}, reported) == {}
    assert delta({"model": {"path": "a"}}, {}) == {"model": {"path": "a"}}


def test_merge_and_flatten_helpers():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": {"e": None}}}) == {"a": {"c": 2}}
    assert merge({}, {"a": [1, 2]}) == {"a": [1, 2]}
    flat = flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}})
    assert flat == {"a.b": 1, "a.c.d": [1]}
    assert unflatten(flat) == {"a": {"b": 1, "c": {"d": [1]}}}


def test_reported_metadata_marks_changed_leaves_only():
    doc = set_reported(ShadowDocument(), {"engine": {"n_ctx": 512, "n_batch": 64}}, 10.0)
    assert doc.reported_meta == {"engine.n_ctx": 10.0, "engine.n_batch": 10.0}
    doc = set_reported(doc, {"engine": {"n_ctx": 1024, "n_batch": 64}}, 20.0)
    assert doc.reported_meta == {"engine.n_ctx": 20.0, "engine.n_batch": 10.0}


def test_get_payloads():
    assert parse_get(b"").client_token is None
    assert parse_get(b'{"client_token": "x1"}').client_token == "x1"
    with pytest.raises(BadRequest) as e:
        parse_get(b'{"client_token": "x1", "what": 1}')
    assert e.value.errors == {"what": "unknown key; a get holds only client_token"} and e.value.client_token == "x1"


def test_parse_update_reads_version_and_token():
    u = parse_update(b'{"state": {"desired": {"engine": {"n_ctx": 512}}}, "version": 3, "client_token": "t"}')
    assert u == UpdateRequest({"engine": {"n_ctx": 512}}, 3, "t")
    assert parse_update(b'{"state": {"desired": null}}').desired is None
    assert MAX_STATE_BYTES == 8192
