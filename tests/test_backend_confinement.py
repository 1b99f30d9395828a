"""A client chooses among the operator's backends; it never names where a request goes.

Two real servers speak the OpenAI wire format: `good` is the daemon's configured
backend, `evil` is one a client would like to reach. Every door a client has —
generation options, `configure_llm`, `mode_state`, metadata — is tried with evil's
address; evil must never see a request, and a run that goes anywhere goes to good."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from conftest import TEST_CONFIG, Daemon
from genvisor.errors import InvalidModeConfig, InvalidOptions, LLMError
from openai_server import FakeOpenAI, text

KEY_ENV = "GENVISOR_TEST_OPENAI_KEY"


@pytest.fixture(scope="module")
def good():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def evil():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(good, tmp_path_factory):
    config = TEST_CONFIG + f"""
[defaults]
backend = "local"

[backends.local]
kind = "openai"
base_url = "{good.base_url}"
api_key_env = "{KEY_ENV}"
model = "test-model"
timeout_ms = 5000
"""
    d = Daemon(tmp_path_factory.mktemp("confined"), config, env={KEY_ENV: "sk-operator"}).start()
    yield d
    assert d.stop() == 0, d.log()


def _evil_host(evil) -> str:
    return urlsplit(evil.base_url).netloc


# Generation options naming evil: each run either fails as a config error before any
# request, or is served by good, unchanged.
GENERATION_OPTIONS = {
    "top_level_base_url": (lambda evil: {"base_url": evil.base_url}, "config"),
    "backend_named_by_address": (lambda evil: {"backend": evil.base_url}, "config"),
    "request_options_base_url": (lambda evil: {"request_options": {"base_url": evil.base_url}}, "config"),
    "request_options_host_header": (lambda evil: {"request_options": {"extra_headers": {"Host": _evil_host(evil)}}}, "config"),
    "request_options_api_key": (lambda evil: {"request_options": {"api_key": "sk-mine"}}, "config"),
    "request_options_extra_query": (lambda evil: {"request_options": {"extra_query": {"to": evil.base_url}}}, "config"),
    "request_options_timeout": (lambda evil: {"request_options": {"timeout": 0.001}}, "config"),
    "backend_opts_base_url": (lambda evil: {"backend_opts": {"base_url": evil.base_url}}, "served"),
    "metadata_base_url": (lambda evil: {"metadata": {"base_url": evil.base_url}}, "served"),
    "provider_and_model": (lambda evil: {"provider": evil.base_url, "model": evil.base_url}, "served"),
}


@pytest.mark.parametrize("name", list(GENERATION_OPTIONS))
def test_generation_options_cannot_send_a_run_elsewhere(daemon, good, evil, conv, name):
    make, expected = GENERATION_OPTIONS[name]
    seen_by_good = len(good.requests)
    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        if expected == "served":
            good.reply(text("from good"))
        ref = client.generate_assistant_reply(conv, **make(evil))
        if expected == "config":
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref)
            assert raised.value.category == "config"
            assert len(good.requests) == seen_by_good
        else:
            assert client.await_generation(conv, ref).text == "from good"
            assert good.headers[-1]["host"] == urlsplit(good.base_url).netloc
            assert good.headers[-1]["authorization"] == "Bearer sk-operator"
    assert evil.requests == []


@pytest.mark.parametrize("options", [
    lambda evil: {"base_url": evil.base_url},
    lambda evil: {"extra_headers": {"Host": _evil_host(evil)}},
    lambda evil: {"api_key_env": "HOME"},
], ids=["base_url", "host_header", "api_key_env"])
def test_configure_llm_refuses_a_transport_and_changes_nothing(daemon, evil, conv, options):
    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        before = client.conversation_thread_entries(conv)
        with pytest.raises(InvalidOptions) as raised:
            client.configure_llm(conv, options=options(evil))
        assert raised.value.field.startswith("options.")
        assert client.conversation_thread_entries(conv) == before
        with pytest.raises(InvalidOptions):
            client.configure_llm("never-created", options=options(evil))
        with pytest.raises(Exception) as missing:
            client.conversation("never-created")
        assert type(missing.value).__name__ == "NotFound"
    assert evil.requests == []


def test_what_configure_llm_and_mode_state_accept_cannot_send_a_run_elsewhere(daemon, good, evil, conv):
    with daemon.client() as client:
        client.start_conversation(conv, metadata={"base_url": evil.base_url, "workspace_url": evil.base_url})
        client.configure_llm(conv, provider=evil.base_url, options={"request_options": {"base_url": evil.base_url}})
        with pytest.raises(InvalidModeConfig):
            client.configure_mode(conv, "coding", {"base_url": evil.base_url})
        good.reply(text("from good"))
        _, result = client.send_and_generate(conv, "hi")
        assert result.text == "from good"
        client.configure_llm(conv, evil.base_url)  # a backend is a configured name, never an address
        client.send_user_message(conv, "again")
        ref = client.generate_assistant_reply(conv)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config" and "unknown backend" in raised.value.message
    assert evil.requests == []
