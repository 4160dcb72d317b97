"""Chat jobs: messages rendered with the model's chat template, or engine.chat_template.

The real Gemma 3 270M file is the base model and has no template: it is given Gemma 3's published
turn template either through engine.chat_template or in a copy of the file whose metadata the
gguf package rewrote (as a user would with gguf_new_metadata). The synthetic tiny model, which has
no template either, gets a ChatML one the same way for the daemon-level tests.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import gguf
import llama_cpp.llama_cpp as C
import pytest

from agent.config import load_settings
from agent.config.sections import EngineSettings
from agent.engine import ChatMessage, Engine, GenerationRequest, ResponseFormat
from agent.errors import ConfigError, EngineError, NoChatTemplate
from agent.models.gguf_info import _Cursor, _read_value, read_model_info
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config

# Gemma 3's chat template as published with the instruction-tuned models (tokenizer_config.json).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = (ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?"))
# What Gemma 3's template makes of QUESTION, written out by hand.
QUESTION_RENDERED = (
    "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
)


def with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF file with tokenizer.chat_template added, as gguf_new_metadata would write it.

    Spliced at the byte level: the header with one more key, the key/value and tensor-info
    sections copied as they are with the new key between them, and the tensor data copied whole
    at the same alignment (tensor offsets are relative to it). The gguf package's reader and
    rewrite take about 17 s each on Gemma's 262k-token vocabulary; this takes well under one."""
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, len(buf))
        c.pos = 8
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        kv_start, align = c.pos, gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = c.string("key")
            value = _read_value(c, key, c.take("I"), {})
            assert key != gguf.Keys.Tokenizer.CHAT_TEMPLATE, "the file has a chat template already"
            align = value if key == gguf.Keys.General.ALIGNMENT else align
        kv_end = c.pos
        for _ in range(n_tensors):
            c.string("tensor name")
            c.skip(8 * c.take("I") + 4 + 8)  # dims, type, offset
        key, value = gguf.Keys.Tokenizer.CHAT_TEMPLATE.encode(), template.encode()
        with open(dst, "wb") as out:
            out.write(buf[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + buf[kv_start:kv_end])
            out.write(
                struct.pack("<Q", len(key)) + key + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(value)) + value
            )
            out.write(buf[kv_end : c.pos])
            out.write(b"\0" * (-out.tell() % align))
            out.write(buf[-(-c.pos // align) * align :])
    before, after = read_model_info(src), read_model_info(dst)
    assert [(t.name, t.nbytes, t.offset - before.data_offset) for t in before.tensors] == [
        (t.name, t.nbytes, t.offset - after.data_offset) for t in after.tensors
    ]
    return dst


@pytest.fixture(scope="module")
def tiny_chatml(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("chat") / "tiny-chatml.gguf", CHATML_TEMPLATE)


def engine_for(model: Path, **settings) -> Engine:
    settings = {"n_ctx": 512, "n_threads": 2, **settings}
    # allow_non_4bit: the Gemma Q4_K_M file's Q8_0 embedding fails the old 4-bit rule (issue 6, item 1).
    engine = Engine(model, engine=EngineSettings(**settings), allow_non_4bit=True)
    engine.load()
    return engine


# ------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_gemma_chat_with_the_template_override(gemma_model: Path) -> None:
    with engine_for(gemma_model, chat_template=GEMMA3_TEMPLATE) as engine:
        res = engine.generate(GenerationRequest(messages=QUESTION, max_tokens=24, temperature=0.0))
        expected_prompt = engine.count_tokens(QUESTION_RENDERED)
        end_of_turn = engine._llama.tokenize(b"<end_of_turn>", add_bos=False, special=True)
        is_eog = [C.llama_vocab_is_eog(engine._llama._model.vocab, t) for t in end_of_turn]
    assert res.finish_reason in ("stop", "length") and 1 <= res.stats.completion_tokens <= 24
    assert res.stats.prompt_tokens == expected_prompt  # usage counts the rendered prompt, one BOS
    assert res.text.strip()
    # <end_of_turn> is one token that llama.cpp counts as end of generation: the engine stops on it.
    # (This base model never learnt to emit it, so the run above ends at max_tokens.)
    assert is_eog == [True]


@pytest.mark.slow
def test_gemma_base_file_without_an_override_refuses_chat(gemma_model: Path) -> None:
    with engine_for(gemma_model) as engine:
        with pytest.raises(NoChatTemplate, match="this model has no chat template"):
            engine.generate(GenerationRequest(messages=QUESTION, max_tokens=4))


@pytest.mark.slow
def test_gemma_chat_with_the_template_in_the_gguf_metadata(gemma_model: Path, tmp_path: Path) -> None:
    copy = with_chat_template(gemma_model, tmp_path / "gemma-3-270m-chat.gguf", GEMMA3_TEMPLATE)
    req = GenerationRequest(messages=QUESTION, max_tokens=12, temperature=0.0)
    with engine_for(copy) as engine:  # no override: the file's own template
        from_metadata = engine.generate(req)
    with engine_for(gemma_model, chat_template=GEMMA3_TEMPLATE) as engine:
        from_override = engine.generate(req)
    assert from_metadata.text == from_override.text
    assert from_metadata.stats.prompt_tokens == from_override.stats.prompt_tokens


@pytest.mark.slow
def test_gemma_chat_ends_at_an_end_of_generation_token_under_a_grammar(gemma_model: Path) -> None:
    # The grammar allows nothing but end-of-generation tokens once "Paris" is written.
    rf = ResponseFormat("json_schema", {"enum": ["Paris", "Lyon"]})
    with engine_for(gemma_model, chat_template=GEMMA3_TEMPLATE) as engine:
        res = engine.generate(GenerationRequest(messages=QUESTION, max_tokens=24, temperature=0.0, response_format=rf))
    assert res.finish_reason == "stop" and json.loads(res.text) in ("Paris", "Lyon")


@pytest.mark.slow
def test_template_refusal_is_an_invalid_request_with_its_words(gemma_model: Path) -> None:
    with engine_for(gemma_model, chat_template=GEMMA3_TEMPLATE) as engine:
        with pytest.raises(EngineError) as info:
            engine.generate(
                GenerationRequest(messages=(ChatMessage("user", "a"), ChatMessage("user", "b")), max_tokens=4)
            )
    assert info.value.code.value == "invalid_request"
    assert str(info.value) == (
        "the chat template (engine.chat_template) refused the messages: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )


# ------------------------------------------------------------------------------- synthetic model


def test_no_template_and_no_override_is_refused(tiny_model: Path) -> None:
    with engine_for(tiny_model) as engine:
        with pytest.raises(NoChatTemplate) as info:
            engine.generate(GenerationRequest(messages=(ChatMessage("user", "hi"),), max_tokens=4))
        # A refusal runs nothing: the engine serves the next job as before.
        assert engine.generate(GenerationRequest("hi", max_tokens=2)).stats.completion_tokens >= 0
    assert info.value.code.value == "no_chat_template" and info.value.code.status.value == "REJECTED"
    assert "this model has no chat template" in str(info.value)


def test_the_files_template_renders_the_messages(tiny_chatml: Path) -> None:
    msgs = (
        ChatMessage("system", "Be terse."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", ""),
        ChatMessage("user", "Again"),
    )
    rendered = (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    with engine_for(tiny_chatml) as engine:
        res = engine.generate(GenerationRequest(messages=msgs, max_tokens=4, temperature=0.0))
        assert res.stats.prompt_tokens == engine.count_tokens(rendered)
        as_prompt = engine.generate(GenerationRequest(rendered, max_tokens=4, temperature=0.0))
    assert res.text == as_prompt.text  # the chat is exactly its rendered prompt


def test_chat_content_counts_against_max_prompt_bytes(tiny_chatml: Path) -> None:
    with engine_for(tiny_chatml, max_prompt_bytes=16) as engine:
        with pytest.raises(EngineError) as info:
            engine.generate(
                GenerationRequest(messages=(ChatMessage("user", "x" * 10), ChatMessage("user", "y" * 7)), max_tokens=2)
            )
    assert info.value.code.value == "prompt_too_large"
    assert str(info.value) == "the messages' contents are 17 bytes, more than engine.max_prompt_bytes 16"


def test_a_broken_template_setting_stops_the_daemon_at_start(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[engine]\nchat_template = "{% for m in messages %}{{ m.content }}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(p, environ={})
    assert "engine.chat_template" in str(info.value) and "not a valid Jinja2 template" in str(info.value)
    assert "endfor" in str(info.value)


DEV = "dev-chat"
ROOT = f"edge/{DEV}"


def run_jobs(config: Path, broker: MosquittoBroker, jobs: dict[str, dict]) -> dict[str, dict]:
    results = {}
    with BrokerClient(broker) as peer:
        peer.subscribe(f"{ROOT}/status")
        peer.subscribe(f"{ROOT}/jobs/+/result")
        with InProcessDaemon(config).start():
            wait_online(peer, DEV)
            for job_id, body in jobs.items():
                peer.publish(f"{ROOT}/jobs/submit", json.dumps({"job_id": job_id, **body}).encode())
            for job_id in jobs:
                results[job_id] = json.loads(peer.expect(f"{ROOT}/jobs/{job_id}/result", timeout=60).payload)
    return results


def test_chat_jobs_through_the_daemon(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, tiny_chatml: Path
) -> None:
    chat = {"kind": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0.0}
    no_template = run_jobs(
        write_daemon_config(tmp_path / "plain", broker, tiny_model, device_id=DEV), broker, {"c-1": chat}
    )
    r = no_template["c-1"]
    assert r["status"] == "REJECTED" and r["error"]["code"] == "no_chat_template" and r["text"] is None

    config = write_daemon_config(tmp_path / "chatml", broker, tiny_chatml, device_id=DEV)
    with_template = run_jobs(config, broker, {
        "c-2": chat,
        "c-3": {**chat, "response_format": {"type": "json_schema", "schema": {"enum": ["yes", "no"]}}, "max_tokens": 8},
    })  # fmt: skip
    ok = with_template["c-2"]
    assert ok["status"] == "SUCCEEDED" and ok["finish_reason"] in ("stop", "length")
    with engine_for(tiny_chatml) as engine:
        assert ok["usage"]["prompt_tokens"] == engine.count_tokens(
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        )
    constrained = with_template["c-3"]
    assert constrained["status"] == "SUCCEEDED" and json.loads(constrained["text"]) in ("yes", "no")


def test_overridden_template_wins_over_the_files(tiny_chatml: Path) -> None:
    with engine_for(tiny_chatml, chat_template="{{ messages[0]['content'] }}!") as engine:
        res = engine.generate(GenerationRequest(messages=(ChatMessage("user", "abc"),), max_tokens=1))
        assert res.stats.prompt_tokens == engine.count_tokens("abc!")


def test_cli_submit_sends_a_chat_job_with_a_schema(
    tmp_path: Path, broker: MosquittoBroker, tiny_chatml: Path, capsys
) -> None:
    from agent.cli import main

    config = write_daemon_config(tmp_path / "cli", broker, tiny_chatml, device_id=DEV)
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"enum": ["yes", "no"]}))
    with BrokerClient(broker) as peer:
        peer.subscribe(f"{ROOT}/status")
        with InProcessDaemon(config).start():
            wait_online(peer, DEV)
            rc = main(["submit", "-c", str(config), "Is it raining?", "--system", "Answer yes or no.",
                       "--json-schema", str(schema), "--job-id", "cli-chat", "--max-tokens", "8", "--wait", "--json"])  # fmt: skip
            out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["status"] == "SUCCEEDED" and json.loads(result["text"]) in ("yes", "no")
    assert main(["jobs", "show", "-c", str(config), "cli-chat"]) == 0
    request = json.loads(capsys.readouterr().out)["request"]
    assert request["kind"] == "chat" and [m["role"] for m in request["messages"]] == ["system", "user"]
    assert request["response_format"] == {"type": "json_schema", "schema": {"enum": ["yes", "no"]}}
    with pytest.raises(SystemExit) as e:  # a usage error, before anything is sent
        main(["submit", "-c", str(config), "x", "--json-schema", "{not json"])
    assert e.value.code == 2
    assert "--json-schema: '{not json': not a JSON Schema file or inline JSON object" in capsys.readouterr().err
