"""``python -m rar_llm.serve.client`` against a stand-in of vLLM's OpenAI-compatible server on localhost.

The stand-in speaks the three endpoints the client uses (``/v1/models``, ``/tokenize``,
``/v1/completions``) the way vLLM does with the RAR plugin: a completion returns the code and position
tokens of the request's order, both branches of a guided image the same ones (each code a function of
the request's seed and cell, so the test can check every code the client writes). It can also answer
errors, non-JSON and truncated answers. The real engine is tested in tests/test_vllm.py (vLLM venv).
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rar_llm.sampling.settings import from_extra_args
from rar_llm.serve import client

LAYOUT = {"codebook_size": 17, "height": 4, "width": 4, "num_classes": 10}


def code(seed: int, cell: int) -> int:
    return (7 * cell + seed) % LAYOUT["codebook_size"]


class StandIn(BaseHTTPRequestHandler):
    """vLLM's API as the client sees it; ``server.mode`` picks how it answers."""

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body: bytes | dict) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.log.append(("GET", self.path, None))
        if self.failed():
            return
        if self.path == "/v1/models":
            self.answer(200, {"data": [{"id": "digits", "root": str(self.server.export)}]})
        else:
            self.answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append(("POST", self.path, body))
        if self.failed():
            return
        layout = client.Layout(LAYOUT)
        if self.path == "/tokenize":
            ids = {"<img_0>": layout.code_offset, "<class_null>": layout.null_class, "<pos_0>": layout.pos_offset,
                   "<eoi>": layout.eoi}
            self.answer(200, {"tokens": [ids[body["prompt"]] + self.server.shift]})
        elif self.path == "/v1/completions":
            try:
                settings, seed, _ = from_extra_args(body["vllm_xargs"])
            except ValueError as e:
                self.answer(400, {"error": {"message": str(e)}})
                return
            tokens = []
            for j, cell in enumerate(settings.order):
                tokens += ([layout.pos_offset + cell] if j else []) + [layout.code_offset + code(seed, cell)]
            if self.server.mode == "short" and body["prompt"][0] == layout.null_class:
                tokens = tokens[:3]
            self.answer(200, {"choices": [{"token_ids": tokens}]})
        else:
            self.answer(404, {"detail": "Not Found"})

    def failed(self) -> bool:
        mode = self.server.mode
        if mode == "error":
            self.answer(500, {"error": {"message": "CUDA out of memory\nTraceback ..."}})
        elif mode == "not json":
            self.answer(200, b"<html>a proxy's login page</html>")
        elif mode == "not vllm":
            self.answer(200, {"hello": "world"})
        elif mode == "hang up":
            self.close_connection = True
            self.wfile.write(b"")
            self.connection.shutdown(2)
        else:
            return False
        return True


@pytest.fixture
def server(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "tokenizer_config.json").write_text(json.dumps({"rar_layout": LAYOUT}))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    httpd.export, httpd.log, httpd.mode, httpd.shift = export, [], "ok", 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of the client's CLI."""
    code_ = 0
    try:
        client.main(argv)
    except SystemExit as e:
        code_ = e.code
    out = capsys.readouterr()
    return code_, out.out, out.err


def images_of(server) -> list[tuple[int, bytes]]:
    """What the stand-in generated: ``(class, code grid bytes)`` per conditional request."""
    layout, out = client.Layout(LAYOUT), []
    for method, path, body in server.log:
        if path == "/v1/completions" and body["prompt"][0] != layout.null_class:
            _, seed, _ = from_extra_args(body["vllm_xargs"])
            grid = np.array([code(seed, cell) for cell in range(16)], dtype=np.int64).reshape(4, 4)
            out.append((body["prompt"][0] - layout.class_offset, grid.tobytes()))
    return sorted(out)


def test_images_and_codes_come_back(server, tmp_path, capsys):
    out, codes = tmp_path / "g.png", tmp_path / "g.npy"
    argv = ["--url", server.url, "--class_id", "3,5", "--num_per_class", "2", "--guidance", "2", "--order", "random",
            "--seed", "4", "--out", str(out), "--codes_out", str(codes)]
    code_, stdout, err = run(argv, capsys)
    assert code_ == 0 and err == "" and "wrote 4 image(s) of classes [3, 5]" in stdout
    got = np.load(codes)
    assert got.shape == (4, 4, 4)
    assert sorted(zip([3, 3, 5, 5], (g.tobytes() for g in got))) == images_of(server)
    grey = np.asarray(Image.open(out))
    assert grey.shape == ((2 * 5 + 1) * 8, (2 * 5 + 1) * 8)  # 2 rows x 2 columns of 4x4 cells, 1-pixel gaps, x8
    assert grey[8, 8] == round(got[0, 0, 0] / 16 * 255)
    completions = [b for m, p, b in server.log if p == "/v1/completions"]
    assert len(completions) == 8  # guided: two requests per image
    first = np.load(codes)
    server.log.clear()
    assert run(argv + ["--overwrite"], capsys)[0] == 0
    assert np.array_equal(np.load(codes), first)  # the same seed, the same images


def test_no_server_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    code_, _, err = run(["--url", f"http://127.0.0.1:{port}", "--class_id", "3", "--out", str(tmp_path / "x.png")], capsys)
    assert code_ == 1 and err.count("\n") == 1
    assert f"http://127.0.0.1:{port}/v1/models: cannot reach the server" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("mode, says", [("error", "answered HTTP 500: CUDA out of memory Traceback"),
                                        ("not json", "the answer is not JSON"), ("not vllm", "the answer has no data/0"),
                                        ("hang up", "the connection failed"), ("short", "came back short")])
def test_a_failing_server_is_one_line(server, mode, says, tmp_path, capsys):
    server.mode = mode
    code_, _, err = run(["--url", server.url, "--guidance", "2", "--out", str(tmp_path / "x.png")], capsys)
    assert code_ == 1 and err.startswith("rar_llm.serve.client: error:") and err.count("\n") == 1, err
    assert says in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*"))


def test_values_are_checked_before_connecting(server, tmp_path, capsys):
    taken = tmp_path / "mine.png"
    taken.write_bytes(b"the user's picture")
    layout = server.export / "tokenizer_config.json"
    cases = {
        ("--out", str(taken)): f"--out {taken} already exists; pass --overwrite",
        ("--codes_out", str(taken.with_suffix(".npy")), "--out", str(taken)): "already exists",
        ("--out", str(tmp_path / "x.jpg")): "name a .png file",
        ("--codes_out", str(tmp_path / "codes")): "name a .npy file",
        ("--url", "localhost:8000"): "expected http://HOST:PORT",
        ("--url", "http://[::1"): "--url 'http://[::1': Invalid IPv6 URL",
        ("--class_id", "3;4"): "--class_id '3;4': expected an id",
        ("--class_id", "10", "--layout", str(layout)): "class id 10 is outside 0..9",
        ("--guidance", "nan"): "guidance=nan must be a finite number",
        ("--guidance", "x"): "argument --guidance: invalid float value: 'x'",
        ("--schedule", "cosine"): "argument --schedule: invalid choice: 'cosine'",
        ("--top_p", "0"): "top_p=0.0 must be in (0, 1]",
        ("--order", "hilbert"): "order 'hilbert': the client draws raster and random",
        ("--order", "[0, 1"): "not a JSON list",
        ("--timeout", "-1"): "--timeout -1.0: expected a number of seconds > 0",
        ("--num_per_class", "0"): "--num_per_class 0: expected 1 or more",
        ("--layout", str(tmp_path)): "not a RAR layout",
    }
    for args, says in cases.items():
        argv = ["--url", server.url, "--out", str(tmp_path / "new.png"), *args]
        code_, _, err = run(argv, capsys)
        assert code_ == 2 and err.count("\n") == 1 and says in err, (args, err)
    assert server.log == [] and taken.read_bytes() == b"the user's picture" and not (tmp_path / "new.png").exists()
    server.shift = 1  # the server's tokenizer is another model's: refused before any completion
    code_, _, err = run(["--url", server.url, "--out", str(tmp_path / "new.png")], capsys)
    assert code_ == 2 and "the layout puts <img_0> at 0 but the server's tokenizer gives [1]" in err
    assert not [p for _, p, _ in server.log if p == "/v1/completions"]


def test_help_lists_the_choices(capsys):
    code_, out, _ = run(["--help"], capsys)
    assert code_ == 0
    assert "{constant,linear,power_cosine}" in out and "raster, random or a JSON list" in out and "--overwrite" in out


FLAGS = {  # flag: (good values, bad values)
    "--class_id": (["0", "9", "1,2,3", "4,4"], ["-1", "x", "1,,2", "", "2.5", "1e3"]),
    "--num_per_class": (["1", "2", "3"], ["0", "-2", "x", "1.5"]),
    "--guidance": (["1", "2.5", "0"], ["nan", "inf", "-inf", "x", ""]),
    "--schedule": (["constant", "linear", "power_cosine"], ["cosine", "", "LINEAR"]),
    "--power": (["1", "2.75"], ["nan", "x"]),
    "--temperature": (["1", "0.5", "0"], ["-1", "nan", "x"]),
    "--top_k": (["1", "4", "17"], ["-3", "x", "1.5"]),
    "--top_p": (["1", "0.9"], ["0", "1.5", "nan", "x"]),
    "--order": (["raster", "random", json.dumps(list(range(16))[::-1])],
                ["hilbert", "[0, 1]", json.dumps([0] * 16), "[", "{}"]),
    "--seed": (["0", "7"], ["x", "1.5"]),
    "--url": ([], ["localhost", "ftp://x", "http://", "http://h:99999", "http://[::1", "not a url"]),
    "--timeout": (["30", "0.5"], ["0", "-1", "nan", "inf", "x"]),
}


def test_fuzz_client_arguments(server, tmp_path, capsys):
    """Seeded: a few flags each, good or bad values; every outcome one line or images the server made."""
    rng, counts = random.Random(23), Counter()
    for case in range(300):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        out = folder / "out.png"
        argv, bad = ["--url", server.url, "--out", str(out)], []
        for flag in rng.sample(sorted(FLAGS), rng.randrange(1, 5)):
            good, wrong = FLAGS[flag]
            if wrong and (not good or rng.random() < 0.3):
                argv += [flag, rng.choice(wrong)]
                bad.append(flag)
            else:
                argv += [flag, rng.choice(good)]
        if rng.random() < 0.2:  # a file of the user's where the client would write
            out.write_bytes(b"mine")
        overwrite = rng.random() < 0.5
        argv += ["--overwrite"] if overwrite else []
        mode = rng.choice(["ok"] * 6 + ["error", "not json", "not vllm", "hang up", "short"])
        server.mode, server.log[:] = mode, []
        code_, _, err = run(argv, capsys)
        label = f"case {case} ({mode}): {argv[4:]}"
        refused_own = out.exists() and out.read_bytes() == b"mine" and not overwrite
        if bad or refused_own:
            assert code_ == 2 and err.count("\n") == 1 and err.startswith("rar_llm.serve.client: error:"), label + err
            assert server.log == [], f"{label}: connected before checking its values"
            counts["bad value: one line, exit 2, nothing sent"] += 1
        elif mode != "ok" and (mode != "short" or "--guidance" in argv and float(argv[argv.index("--guidance") + 1]) != 1):
            assert code_ == 1 and err.count("\n") == 1, label + err
            counts["failing server: one line, exit 1"] += 1
        else:
            assert code_ == 0 and err == "", label + err
            grid = np.asarray(Image.open(out))
            assert grid.ndim == 2 and grid.shape[0] > 8, label
            counts["images written"] += 1
        if code_ != 0:
            assert (out.read_bytes() == b"mine") if out.exists() else True, f"{label}: the user's file changed"
            assert {p.name for p in folder.iterdir()} <= {"out.png"}, f"{label}: left {list(folder.iterdir())}"
    print(f"\nclient fuzz: 300 cases: {dict(counts)}")
    assert len(counts) == 3 and all(v >= 20 for v in counts.values()), dict(counts)
