"""The command line: bad input gets one line and a non-zero exit; one real run end to end."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import synth
from engram_llama import profile
from engram_llama.gguf_check import identity
from engram_llama.policy import MOVE_FROM, MOVE_STRENGTH, Policy

from conftest import ROOT, gemma3_path, smollm2_path


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "engram_llama.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def research_ask(*args):
    """`python -m research ask`: `run` with the settings that left the user CLI."""
    return subprocess.run([sys.executable, "-m", "research", "ask", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def one_line_error(r, *fragments):
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    (d / "a.md").write_text("The delivery code for Indore is 4417.\n")
    return d


def test_inspect_lists_layer_kinds():
    r = cli("inspect", str(synth.cached_model("qwen35")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen35" and info["biasable"] == [3, 7]
    assert info["layers"] == ["none", "none", "none", "full"] * 2
    assert info["biased_by_default"] == [3, 7]  # a hybrid: every softmax layer
    assert info["profile"] is None
    # Gemma-3-270M's built-in profile biases the global layers, as the family does
    r = cli("inspect", str(gemma3_path()), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["biased_by_default"] == [5, 11, 17] and info["profile"]["biased"] == [5, 11, 17]
    assert Path(info["profile"]["path"]).parent == profile.BUILTIN


def test_inspect_shows_a_late_profiles_layers(tmp_path):
    """A dense model whose profile chose the late layers: inspect names its last quarter."""
    model = synth.cached_model("llama-smol")
    ident = identity(model)
    profile.write(profile.Profile(Policy(steer=True, peak=4.0, layers="late"), ident),
                  tmp_path / "profiles" / f"{profile.key(ident)}.json")
    r = subprocess.run([sys.executable, "-m", "engram_llama.cli", "inspect", str(model)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "ENGRAM_LLAMA_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"(\d+) layers", r.stdout).group(1))
    line = next(l for l in r.stdout.splitlines() if l.startswith("biased by its profile:"))
    late = list(range(n - n // 4, n))  # the last quarter (at least one) of a dense model's layers
    assert late and line.split()[4] == (f"{late[0]}-{late[-1]}" if len(late) > 1 else f"{late[0]}")
    assert str(tmp_path) in line and n // 2 not in late   # not the family's second half


def test_missing_model(docs):
    one_line_error(cli("run", "/no/such.gguf", "q?", "--chunks", str(docs)), "model file not found")


def test_not_a_gguf(docs, tmp_path):
    p = tmp_path / "m.gguf"
    p.write_text("hello")
    one_line_error(cli("run", str(p), "q?", "--chunks", str(docs)), "not a GGUF file")


def test_truncated_gguf(docs, tmp_path):
    src = synth.cached_model("llama").read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(src[: len(src) // 2])
    one_line_error(cli("run", str(p), "q?", "--chunks", str(docs)), "truncated")
    p.write_bytes(src[:200])
    one_line_error(cli("inspect", str(p)), "t.gguf")


def test_docs_problems(tmp_path):
    model = str(smollm2_path())
    one_line_error(cli("run", model, "q?", "--chunks", str(tmp_path / "nope")), "docs folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("run", model, "q?", "--chunks", str(empty)), "no readable .txt or .md")
    # the documented order: MODEL --chunks DIR "question" (positionals after options)
    one_line_error(cli("run", model, "--chunks", str(empty), "q?"), "no readable .txt or .md")


def test_empty_question_and_bad_layers(docs):
    model = str(smollm2_path())
    one_line_error(cli("run", model, "  ", "--chunks", str(docs)), "question is empty")
    one_line_error(cli("run", model, "--chunks", str(docs), "  "), "question is empty")
    bad = subprocess.run([sys.executable, "-m", "engram_llama.cli", "run", model, "--chunks", str(docs).encode(),
                          b"caf\xe9?"], capture_output=True, text=True, timeout=600)   # Latin-1 bytes in argv
    one_line_error(bad, "not UTF-8")
    one_line_error(cli("run", model, "q?", "--chunks", str(docs), "--layers", "3-x"), "invalid --layers")
    one_line_error(cli("run", model, "q?", "--chunks", str(docs), "--layers", "40"), "layer 40", "30 layers")
    # a range is refused before it is expanded (this one would not fit in memory)
    one_line_error(cli("run", model, "q?", "--chunks", str(docs), "--layers", "0-1000000000000000"), "invalid --layers")
    # the options that lost on the project's measurements are not the user's: one line, exit 2
    for flag in ("--top-k", "--mid", "--near", "--granularity", "--reread", "--target-share"):
        r = cli("run", model, "q?", "--chunks", str(docs), flag, "1")
        one_line_error(r, "unrecognized arguments", flag)
        assert r.returncode == 2
    # the research entry point takes them, and checks them as the library does
    one_line_error(research_ask(model, "q?", "--chunks", str(docs), "--top-k", "0"), "invalid top_k 0")
    one_line_error(research_ask(model, "q?", "--chunks", str(docs), "--mid", "nan"), "invalid mid nan")
    one_line_error(research_ask(model, "q?", "--chunks", str(docs), "--order", "move", "--no-gate"),
                   "order 'move' needs the query gate")
    one_line_error(research_ask(model, "q?", "--chunks", str(docs), "--order", "move", "--granularity", "sentence"),
                   "order 'move'", "granularity must be 'chunk' or 'novel'")
    one_line_error(cli("run", model, "q?", "--chunks", str(docs), "--max-ctx", "100"), "invalid --max-ctx 100")
    # llama-cpp-python reads max_tokens <= 0 as "until the context is full"
    for flag, value in (("-n", "0"), ("-n", "-5"), ("--temp", "-1"), ("--temp", "nan"), ("-t", "0")):
        one_line_error(cli("run", model, "q?", "--chunks", str(docs), flag, value), f"invalid {flag} {value}")
    gemma = str(synth.cached_model("gemma3"))
    one_line_error(cli("run", gemma, "q?", "--chunks", str(docs), "--order", "move", "--no-chat"),
                   "--order move needs a model whose every layer keeps the whole context")


def test_explain_gives_the_profile_and_each_span(docs):
    model, q = str(smollm2_path()), "What is the delivery code for Indore?"
    r = cli("run", model, q, "--chunks", str(docs), "--explain", "-n", "2", "--order", "keep")
    assert r.returncode == 0, r.stderr
    # a ~60-token prompt: +2 everywhere (the length's strength, the middle's by length, near)
    assert "strength +2.00 next to the question, +2.00 in the middle, +2.00 at the start" in r.stdout
    assert re.search(r"\+2\.00 on tokens \d+-\d+ \(chunk 0: the whole chunk\)", r.stdout), r.stdout
    # (research) --strength 3 --mid 5 --near 1: the one chunk ends d = (q0 - end) / q0 before the
    # question, inside the near ramp (d < 1/4): 1 + (5 - 1) d / (1/4)
    r = research_ask(model, q, "--chunks", str(docs), "--explain", "-n", "2", "--strength", "3", "--mid", "5",
                     "--near", "1", "--order", "keep")
    assert "strength +1.00 next to the question, +5.00 in the middle, +3.00 at the start" in r.stdout, r.stdout + r.stderr
    q0 = int(re.search(r"from token (\d+) on", r.stdout).group(1))
    value, end = re.search(r"\+(\d+\.\d+) on tokens \d+-(\d+) ", r.stdout).groups()
    d = (q0 - int(end) - 1) / q0
    assert d < 0.25 and float(value) == pytest.approx(1.0 + 4.0 * d / 0.25, abs=0.006)


def test_context_too_small(docs):
    one_line_error(cli("run", str(smollm2_path()), "What is the code for Indore?", "--chunks", str(docs), "-c", "64"),
                   "too small")


def test_default_run_end_to_end():
    r = cli("run", "--default", "--json", "-n", "32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"]
    # the MGNREGA document is ranked and biased first, from the question on, and the answer is read
    # from it (vanilla SmolLM2 invents "10 days" here; +4 in the middle recites its Hindi heading)
    # at +2: the prompt is under 1.5K tokens, where the middle gets no more than the rest
    assert out["citations"][0]["source"] == "mgnrega.md" and out["citations"][0]["relevance"] == 1.0
    # the answer runs on to -n 32 ("... at least 100 days of wage"), and --json says so
    assert "100 days" in out["answer"] and out["finish_reason"] == "length"
    # under MOVE_FROM tokens the default order is the given one (ORDER_AUTO moves from there on)
    plan = out["plan"]
    assert plan["order"] == "keep" and plan["moved_tokens"] is None and out["prompt_tokens"] < MOVE_FROM
    assert plan["layers"] == list(range(15, 30)) and plan["strength"] == 2.0 and plan["steered"]
    # every part of the plan is in the output
    # no rerank: BM25 and entities put mgnrega.md first by more than relevance.RERANK_LEAD
    assert (plan["top_k"], plan["granularity"], plan["rerank"], plan["reread"]) == (1, "novel", 0, False)
    assert out["profile"]["calibrated"] is False and "calibrate" in out["profile"]["hint"]
    span = plan["spans"][0]
    n, q0 = out["prompt_tokens"], plan["gate_token"]
    assert span["tokens"][1] <= q0 < n and 1024 < n < 2048
    # under 1,536 tokens the middle's strength is the length's +2, so the ramp is flat at +2 (its
    # shape above that length: test_runtime's near-ramp test)
    assert n < 1536 and plan["near"] == 2.0 and plan["mid"] == 2.0 and span["value"] == pytest.approx(2.0, abs=2e-4)
    vanilla = json.loads(cli("run", "--default", "--json", "-n", "32", "--no-engram").stdout)
    vp = vanilla["plan"]
    assert vp["layers"] == [] and vp["spans"] == [] and vp["mid"] is None and not vp["steered"]
    assert vp["order"] == "keep" and "100 days" not in vanilla["answer"]
    # the help names the bar (argparse may wrap the line anywhere)
    help_text = cli("run", "--help").stdout
    assert re.search(rf"from\s+{MOVE_FROM}\s+prompt\s+tokens", help_text)
    assert re.search(rf"then\s+\+{MOVE_STRENGTH:g}\s+on\s+it\)", help_text)


def test_context_defaults_to_what_the_documents_need(docs, tmp_path):
    """-c by default: the documents' prompt and the answer, rounded up to 256 (at least 512); capped
    by --max-ctx, with one note saying how many chunks were left out and why."""
    model = str(smollm2_path())
    r = cli("run", model, "What is the delivery code for Indore?", "--chunks", str(docs), "--explain", "-n", "4")
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"explain: (\d+) prompt tokens in a (\d+)-token context", r.stdout).group(1))
    ctx = int(re.search(r"in a (\d+)-token context", r.stdout).group(1))
    assert ctx == max(512, -(-(n + 4 + 64) // 256) * 256)
    big = tmp_path / "big"
    big.mkdir()
    for k in range(12):  # ~12 x 160 tokens: more than a 512-token cap holds
        (big / f"{k:02d}.md").write_text(" ".join(f"Depot {k}-{j} ships parcel code {1000 * k + j}." for j in range(24)))
    r = cli("run", model, "Which depot ships parcel code 5007?", "--chunks", str(big), "--max-ctx", "1024", "-n", "4",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    notes = [l for l in r.stderr.splitlines() if "note" in l]
    assert len(notes) == 1 and "capped at 1024 by --max-ctx 1024" in notes[0], r.stderr
    assert out["dropped_chunks"] and out["prompt_tokens"] + 4 <= 1024


def test_bad_table_file(docs, tmp_path):
    bad = tmp_path / "t.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    one_line_error(cli("run", str(smollm2_path()), "q?", "--chunks", str(docs), "--table", str(bad)), "t.gguf")
    one_line_error(cli("run", str(smollm2_path()), "q?", "--chunks", str(docs), "--table",
                       str(synth.cached_model("llama"))), "not an engram table")


def test_hf_offline_is_one_line(docs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(cli("run", "--hf", "someone/some-model-GGUF", "q?", "--chunks", str(docs)), "someone/some-model-GGUF")


def test_interactive_follow_ups(docs):
    """A line that is not UTF-8 is skipped with a note; the session goes on."""
    r = subprocess.run([sys.executable, "-m", "engram_llama.cli", "run", str(smollm2_path()), "--chunks", str(docs),
                        "-i", "-n", "6", "--json"], capture_output=True, timeout=600,
                       input=b"What is the code for Indore?\ncaf\xe9?\nWhich city has code 4417?\n")
    assert r.returncode == 0, r.stderr
    assert b"not UTF-8 text; skipped" in r.stderr
    outs = [json.loads(l) for l in r.stdout.decode().splitlines() if l.startswith("{")]
    assert [o["question"] for o in outs] == ["What is the code for Indore?", "Which city has code 4417?"]
    assert all(o["citations"][0]["source"] == "a.md" for o in outs)


def test_layers_without_softmax_attention_are_refused(docs):
    one_line_error(cli("run", str(synth.cached_model("qwen35")), "q?", "--chunks", str(docs), "--layers", "0,3"),
                   "layer 0 cannot take a bias", "no softmax attention", "biasable: 3,7")


def test_hf_picks_the_model_file_of_a_gguf_repository():
    from engram_llama.cli import pick_gguf

    files = ["README.md", "mmproj-F16.gguf", "Qwen3.5-2B-BF16.gguf", "Qwen3.5-2B-Q8_0.gguf",
             "Qwen3.5-2B-Q4_K_M.gguf", "Qwen3.5-2B-UD-Q4_K_XL.gguf"]
    assert pick_gguf(files) == "Qwen3.5-2B-Q4_K_M.gguf"              # never the vision projector
    assert pick_gguf(files, "Q8_0") == "Qwen3.5-2B-Q8_0.gguf"        # llama-server's REPO:QUANT
    assert pick_gguf(files, "q4_k_xl") == "Qwen3.5-2B-UD-Q4_K_XL.gguf"
    assert pick_gguf(files, "Qwen3.5-2B-BF16.gguf") == "Qwen3.5-2B-BF16.gguf"
    assert pick_gguf(files, "Q3_K_S") is None and pick_gguf(["mmproj-F16.gguf"]) is None


def test_serve_bad_input_is_one_line_before_any_loading(tmp_path):
    import socket

    one_line_error(cli("serve", str(tmp_path / "missing.gguf")), "missing.gguf")
    one_line_error(cli("serve", str(smollm2_path()), "-np", "0"), "-np 0")
    one_line_error(cli("serve", str(smollm2_path()), "--api-key", ""), "--api-key")   # an unset $KEY: not an open server
    one_line_error(cli("serve", str(smollm2_path()), "--host", ""), "--host")
    one_line_error(cli("serve", str(smollm2_path()), "--chunks", str(tmp_path / "nowhere")), "nowhere")
    with socket.socket() as s:   # a port in use
        s.bind(("127.0.0.1", 0))
        s.listen()
        one_line_error(cli("serve", str(smollm2_path()), "--port", str(s.getsockname()[1])), "cannot listen on")


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_an_encoder_model_is_refused_before_loading(docs, tmp_path, arch):
    """T5 would take the documents into its encoder, where the bias never reaches; an encoder writes
    no text: one line, before llama.cpp opens the file."""
    import gguf
    p = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(p), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    for args in (("run", str(p), "q?", "--chunks", str(docs)), ("inspect", str(p)), ("calibrate", str(p))):
        one_line_error(cli(*args), f"is a {arch} model")
