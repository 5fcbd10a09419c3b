"""`engram-llama serve` with the real openai client on a free loopback port (SmolLM2, two slots):
chat, streaming, documents, citations, the API key, concurrency equal to one at a time, a client
gone mid-stream, bad requests answered with OpenAI-style errors while the server stays up, and the
README's curl example."""
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, smollm2_path

KEY = "sk-engram-test"
DOCS = [
    {"id": "kv-1", "title": "Indore depot", "text": "The delivery code for the Indore depot is 4417. Trucks leave at dawn."},
    {"id": "kv-2", "title": "Bhopal depot", "text": "The delivery code for the Bhopal depot is 5120. Trucks leave at noon."},
    {"id": "kv-3", "title": "Ujjain depot", "text": "The delivery code for the Ujjain depot is 8861. Trucks leave at dusk."},
]
QUESTIONS = ["What is the delivery code for the Indore depot?", "What is the delivery code for the Bhopal depot?",
             "When do trucks leave the Ujjain depot?", "What is the delivery code for the Ujjain depot?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engram_llama.cli", "serve", str(smollm2_path()), "--port", str(port),
                             "-np", "2", "-c", "2048", "--api-key", KEY, "-t", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not come up")
    yield base
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _ask(client, q, **kw):
    return client.chat.completions.create(model=_model_id(client), messages=[{"role": "user", "content": q}],
                                          max_tokens=24, temperature=0, extra_body={"documents": DOCS, **kw})


_IDS = {}


def _model_id(client):
    if "id" not in _IDS:
        _IDS["id"] = client.models.list().data[0].id
    return _IDS["id"]


def test_models_health_and_the_api_key(server, client):
    assert httpx.get(server + "/health").json()["status"] == "ok"          # /health needs no key
    assert _model_id(client) == smollm2_path().stem
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    import openai

    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=_model_id(client), messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"documents": DOCS})


def test_chat_answers_from_the_documents_and_cites_them(client):
    r = _ask(client, QUESTIONS[0])
    assert "4417" in r.choices[0].message.content
    cites = r.model_extra["citations"]
    assert cites[0]["id"] == "kv-1" and cites[0]["title"] == "Indore depot" and cites[0]["position"] == 1
    assert r.usage.prompt_tokens > 50 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    off = _ask(client, QUESTIONS[0], engram={"off": True})   # the same prompt unsteered: still an answer
    assert off.choices[0].message.content and off.usage.prompt_tokens == r.usage.prompt_tokens


def test_streaming_gives_the_same_answer_and_citations_last(client):
    plain = _ask(client, QUESTIONS[1])
    stream = client.chat.completions.create(model=_model_id(client), messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            max_tokens=24, temperature=0, stream=True, extra_body={"documents": DOCS})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["citations"] == plain.model_extra["citations"]


def test_concurrent_answers_equal_one_at_a_time(client):
    alone = [_ask(client, q).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(4) as ex:  # four requests on two slots: two wait in the queue
        together = list(ex.map(lambda q: _ask(client, q).choices[0].message.content, QUESTIONS))
    assert together == alone


def test_a_client_gone_mid_stream_frees_its_slot(server, client):
    """The answer stops at its next token (counted by the server) and the slot comes back."""
    before = httpx.get(server + "/health").json()["answers_cancelled"]
    body = {"model": _model_id(client), "messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 200,
            "stream": True, "documents": DOCS, "engram": {"strength": 40}}   # a strength that makes it ramble
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break   # the first piece, then gone
    deadline = time.time() + 60
    while (h := httpx.get(server + "/health").json())["slots_idle"] < 2 or h["answers_cancelled"] == before:
        assert time.time() < deadline, f"the answer was not stopped: {h}"
        time.sleep(0.2)
    assert h["answers_cancelled"] == before + 1
    assert "4417" in _ask(client, QUESTIONS[0]).choices[0].message.content


def _post(server, body: bytes, key=KEY, **headers):
    return httpx.post(server + "/v1/chat/completions", content=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers})


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client):
    mid = _model_id(client)
    ok = {"model": mid, "messages": [{"role": "user", "content": "What is Indore's code?"}], "documents": DOCS}

    def err(body, status, *words):
        r = _post(server, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert all(w in e["message"] for w in words), e["message"]
        return e

    err(b'{"messages": [', 400, "not valid JSON")
    err(b"[" * 100000, 400, "not valid JSON")   # nested past Python's recursion limit
    err({"model": mid}, 400, "messages")
    err({**ok, "messages": []}, 400, "messages")
    err({**ok, "messages": [{"role": "user", "content": "   "}]}, 400, "question", "empty")
    err({**ok, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message")
    assert err({**ok, "model": "gpt-4o"}, 404, "gpt-4o")["code"] == "model_not_found"
    err(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "not UTF-8")
    err({**ok, "documents": [{"text": "x"}] * 513}, 400, "too many documents", "513")
    err({**ok, "documents": []}, 400, "documents")
    err({**ok, "engram": {"layers": "99"}}, 400, "layers")
    err({**ok, "engram": {"colour": "red"}}, 400, "engram")
    err({**ok, "max_tokens": 0}, 400, "max_tokens")
    big = {**ok, "messages": [{"role": "user", "content": "Why? " * 3000}]}   # the question alone overflows 2048
    e = err(big, 400, "2048")   # OpenAI's status for an overflow: clients look for it
    assert e["code"] == "context_length_exceeded"
    # streamed, the same errors are the response's status, not an event after a 200
    assert err({**big, "stream": True}, 400, "2048")["code"] == "context_length_exceeded"
    err({**ok, "stream": True, "engram": {"layers": "99"}}, 400, "layers")
    err(b"x" * (9 << 20), 413, "limit")
    # still up, and still right
    assert "4417" in _ask(client, QUESTIONS[0]).choices[0].message.content


def test_the_readme_curl_example(server, client):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(curl [^`]*?)```", readme).group(1)
    cmd = block.replace("http://127.0.0.1:8080", server).replace("\\\n", " ")
    cmd = cmd.replace("-H 'Content-Type: application/json'",
                      f"-H 'Content-Type: application/json' -H 'Authorization: Bearer {KEY}'")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"]
    assert out["citations"] and {"id", "title", "position", "relevance"} <= set(out["citations"][0])
    # what the README shows it for: Indore's code, read from Indore's document (Bhopal's is 5120)
    assert out["citations"][0]["id"] == "d1" and "4417" in out["choices"][0]["message"]["content"]


def test_a_shutdown_frees_no_engine_while_an_answer_still_runs_on_it():
    """Freeing a context under a running answer would decode into freed memory: after the wait,
    close leaves a busy service's engines to the process's exit."""
    from engram_llama.server import Config, Service

    class Engine:
        closed = False

        def close(self):
            self.closed = True

    engines = [Engine(), Engine()]
    service = Service(Config("m", 2048), engines)
    service._busy = 1   # an answer's thread has not ended
    assert service.close(timeout=0.01) is False and not any(e.closed for e in engines)
    service._busy = 0
    assert service.close(timeout=0.01) is True and all(e.closed for e in engines)
