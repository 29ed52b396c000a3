"""``rar-llm web`` as people use it: the page's HTTP API (gradio_client), and a real headless Chromium (slow)."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from rar_llm.checkpoint import load_model  # noqa: E402
from rar_llm.sampling.loop import generate  # noqa: E402
from rar_llm.serve.web import RequestError, WebGenerator  # noqa: E402

DEFAULTS = dict(class_name="seven", prompt="", guidance=2.0, schedule="constant", power=0.0, temperature=1.0,
                top_k=0, top_p=1.0, order="raster", steps=0, speculative=0, seed=0, num_images=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """``rar-llm web`` started as a user starts it, on a free localhost port; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "web.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rar_llm", "web", "--checkpoint_dir", str(tiny_checkpoint),
                                 "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Running on local URL" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    assert "Running on local URL" in log.read_text(), log.read_text()
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def ask(client: Client, **changes) -> np.ndarray:
    """The page's /generate endpoint; the returned PNGs as the code grids they draw (digits: grey k/16)."""
    args = {**DEFAULTS, **changes}
    gallery = client.predict(*args.values(), api_name="/generate")
    grids = []
    for item in gallery:
        a = np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float64)
        step = a.shape[0] // 8  # nearest-upscaled 8x8 cells
        grids.append(np.rint(a[step // 2 :: step, step // 2 :: step] / 255 * 16).astype(int))
    return np.stack(grids)


def expected(checkpoint, class_id: int, seed: int, n: int = 4, **settings) -> np.ndarray:
    model = load_model(checkpoint)
    return generate(model, class_id, num_samples=n, seed=seed, guidance=2.0, **settings).numpy()


def test_generate_over_http_gives_the_class_and_the_seed_asked_for(server, tiny_checkpoint):
    client = Client(server, verbose=False)
    sevens = ask(client, class_name="seven", seed=3)
    assert np.array_equal(sevens, expected(tiny_checkpoint, 7, seed=3))  # rar_llm.generate's draws, class 7
    assert not np.array_equal(sevens, expected(tiny_checkpoint, 2, seed=3))
    assert np.array_equal(ask(client, class_name="seven", seed=3), sevens)  # same seed, same images
    assert not np.array_equal(ask(client, class_name="seven", seed=4), sevens)
    spec = ask(client, class_name="seven", seed=3, speculative=3, order="spiral_in", top_k=5)  # settings pass through
    assert np.array_equal(spec, expected(tiny_checkpoint, 7, seed=3, speculative=3, order="spiral_in", top_k=5))


def test_concurrent_clients_get_their_own_images(server, tiny_checkpoint):
    seeds = [11, 12, 13, 14]
    alone = {s: expected(tiny_checkpoint, 5, seed=s) for s in seeds}
    got, errors = {}, []

    def user(seed):
        try:
            got[seed] = ask(Client(server, verbose=False), class_name="five", seed=seed)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(np.array_equal(got[s], alone[s]) for s in seeds)


@pytest.mark.parametrize("changes, message", [
    (dict(class_name="eleven"), "unknown class 'eleven'"),
    (dict(guidance=-3.0), "guidance=-3.0 must be a finite scale >= 0"),
    (dict(num_images=99), "number of images 99 must be a whole number from 1 to 16"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(steps=4, speculative=2), "exclude each other"),
    (dict(prompt="a seven"), "trained on class labels only"),
])
def test_bad_input_is_a_message_and_the_server_keeps_serving(server, tiny_checkpoint, changes, message):
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ask(client, **changes)
    assert np.array_equal(ask(client, seed=1), expected(tiny_checkpoint, 7, seed=1))


@pytest.fixture(scope="module")
def gen(tiny_checkpoint):
    return WebGenerator(tiny_checkpoint)


def test_inpainting_keeps_the_kept_cells_and_redraws_the_others(gen):
    s = gen.settings(2.0, "constant", 0.0, 1.0, 0, 1.0, "raster", 0, 0)
    source = gen.sample(s, seed=0, num_images=1, class_name="three", progress=False)[0].numpy()
    edit = gen.encode_upload(save_png(gen, source))  # the round trip an upload takes
    assert np.array_equal(edit.codes, source) and edit.keep.all()
    edit.keep[4:] = False  # redraw the bottom half
    out = gen.sample(s, seed=1, num_images=6, class_name="three", known=edit.codes, keep=edit.keep,
                     progress=False).numpy()
    assert (out[:, :4] == source[:4]).all()
    assert (out[:, 4:] != source[4:]).any()
    veil = np.asarray(gen.draw_edit(edit))  # released cells are tinted red, kept ones are grey
    assert (veil[-1, -1, 0] > veil[-1, -1, 1]) and veil[0, 0, 0] == veil[0, 0, 1]
    assert gen.cell_at(edit, 0, veil.shape[0] - 1, veil.shape[1], veil.shape[0]) == (7, 0)


def save_png(gen, codes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "upload.png"
    gen.images(torch.as_tensor(codes)[None])[0].save(path)
    return path


def test_a_file_that_is_not_an_image_is_a_message(gen, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(RequestError, match="notes.png is not an image"):
        gen.encode_upload(path)


def test_cli_refuses_bad_flags_in_one_line(tiny_checkpoint, tmp_path):
    ckpt = ["--checkpoint_dir", str(tiny_checkpoint)]
    for args, message in ((ckpt + ["--port", "70000"], "--port 70000 must be in 0..65535"),
                          (ckpt + ["--tokenizer", str(tmp_path / "missing.safetensors")], "unknown tokenizer"),
                          (["--checkpoint_dir", str(tmp_path / "nope")], "checkpoint folder")):
        run = subprocess.run([sys.executable, "-m", "rar_llm", "web", *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


# ---- a real browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium and ChromeDriver, installed here (the test set-up) when missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("needs Debian's chromium and chromium-driver (apt-get as root)")
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True,
                       capture_output=True, timeout=900)
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_a_browser_clicks_generate_and_sees_the_images(server, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.get(server)
    wait = WebDriverWait(chromium, 120)
    wait.until(ec.element_to_be_clickable((By.ID, "generate"))).click()
    images = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img") or False)
    assert len(images) >= 1
    wait.until(lambda d: all(i.get_attribute("naturalWidth") not in (None, "0") for i in
                             d.find_elements(By.CSS_SELECTOR, "#gallery img")))
    chromium.save_screenshot(str(tmp_path / "web.png"))
    assert Image.open(tmp_path / "web.png").size[0] > 0
    # a bad value typed into the page: an error shows, and the page still generates afterwards
    box = chromium.find_element(By.CSS_SELECTOR, "#guidance input")
    box.clear()
    box.send_keys("-3")
    chromium.find_element(By.ID, "generate").click()
    wait.until(lambda d: "must be a finite scale" in d.find_element(By.TAG_NAME, "body").text)
    box.clear()
    box.send_keys("2")
    chromium.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))


def test_a_caption_model_draws_from_the_caption_box(tmp_path):
    """A model trained on captions (layout with a text vocabulary): the caption goes to generate(prompt=...)."""
    from rar_llm.checkpoint import init

    ckpt = init(tmp_path / "mixed", model="rar-tiny", layout="digits_pydoc")
    web_gen = WebGenerator(ckpt)
    s = web_gen.settings(2.0, "constant", 0.0, 1.0, 0, 1.0, "raster", 0, 0)
    got = web_gen.sample(s, seed=5, num_images=3, class_name="seven", prompt="a handwritten seven", progress=False)
    want = generate(load_model(ckpt), prompt="a handwritten seven", num_samples=3, seed=5, guidance=2.0)
    assert torch.equal(got, want)
    by_class = web_gen.sample(s, seed=5, num_images=3, class_name="seven", progress=False)
    assert torch.equal(by_class, generate(load_model(ckpt), 7, num_samples=3, seed=5, guidance=2.0))
