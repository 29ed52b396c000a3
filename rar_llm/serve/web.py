"""``rar-llm web``: a Gradio page to try a trained generator in the browser (the ``web`` extra).

The model loads once; every request carries its own seed and settings, and generation events run one
at a time on it (the KV cache is the model's), so users never share a random stream. What a request
gets wrong (an unknown class, a guidance of -3, a file that is not an image) comes back as a message
in the page, and the server goes on serving.

Inpainting: pick an image of the gallery (or upload one, encoded by the image tokenizer), click cells
to keep or release them, and redraw the released cells with ``generate(known=, known_mask=)``.
"""

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rar_llm.checkpoint import DTYPES, load_model
from rar_llm.sampling.loop import check_speculative, generate
from rar_llm.sampling.settings import ORDERS, SCHEDULES, SamplingSettings
from rar_llm.tokenizers.draw import DIGITS_LEVELS, CodeDecoder, check_drawable, image_grid, to_pixels

SHOWN_PX = 256  # gallery and edit images are nearest-upscaled to at least this many pixels a side


class RequestError(ValueError):
    """A bad value in one request: shown in the page, the server keeps serving."""


@dataclass
class Edit:
    """One user's image being inpainted: its code grid and which cells stay (a session's state)."""

    codes: np.ndarray  # (H, W) codes
    keep: np.ndarray = field(default=None)  # (H, W) bool

    def __post_init__(self) -> None:
        if self.keep is None:
            self.keep = np.ones(self.codes.shape, dtype=bool)


class WebGenerator:
    """The loaded model, its layout and image tokenizer, and the page's actions as plain functions."""

    def __init__(self, checkpoint_dir: Path, tokenizer: CodeDecoder | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, max_images: int = 16) -> None:
        self.model = load_model(checkpoint_dir, device, dtype)
        self.layout = layout = self.model.layout
        if tokenizer is None and (layout.codebook_size, layout.height, layout.width) == (DIGITS_LEVELS, 8, 8):
            from rar_llm.tokenizers import load_tokenizer

            tokenizer = load_tokenizer("digits")  # draws k/16 like to_pixels, and encodes uploads
        check_drawable(layout, tokenizer)
        self.tokenizer = tokenizer
        self.max_images = max_images
        names = layout.class_names or tuple(str(c) for c in range(layout.num_classes))
        self.class_names = list(names)
        self.lock = threading.Lock()  # one decode at a time on the model's KV cache

    # ---- what a request asks for, checked once --------------------------------------------------------

    def class_id(self, name: str) -> int:
        if name in self.class_names:
            return self.class_names.index(name)
        if str(name).strip().isdigit() and int(name) < len(self.class_names):
            return int(name)
        raise RequestError(f"unknown class {name!r}; pick one of {self.class_names}")

    def settings(self, guidance: float, schedule: str, power: float, temperature: float, top_k: int | None,
                 top_p: float, order: str, steps: int | None, speculative: int) -> SamplingSettings:
        try:
            s = SamplingSettings(guidance=float(guidance), schedule=schedule, power=float(power),
                                 temperature=float(temperature), top_k=int(top_k) if top_k else None,
                                 top_p=float(top_p), order=order, steps=int(steps) if steps else None)
            check_speculative(int(speculative or 0), s, kv_cache=True)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        return s

    def check_count(self, num_images, seed) -> tuple[int, int]:
        if not float(num_images).is_integer() or not 1 <= int(num_images) <= self.max_images:
            raise RequestError(f"number of images {num_images} must be a whole number from 1 to {self.max_images}")
        if not float(seed).is_integer() or not 0 <= int(seed) < 2**63:
            raise RequestError(f"seed {seed} must be a whole number >= 0")
        return int(num_images), int(seed)

    # ---- actions ---------------------------------------------------------------------------------------

    def sample(self, settings: SamplingSettings, seed: int, num_images: int, class_name: str = "", prompt: str = "",
               speculative: int = 0, known: np.ndarray | None = None, keep: np.ndarray | None = None,
               progress: bool = True) -> torch.Tensor:
        """``num_images`` code grids for a class (or a caption prompt), optionally around kept cells."""
        cond = {"prompt": prompt} if prompt.strip() else {"class_id": self.class_id(class_name)}
        if "prompt" in cond and not self.layout.text_vocab_size:
            raise RequestError("this model was trained on class labels only; leave the caption empty")
        extra = {}
        if known is not None:
            extra = {"known": torch.as_tensor(known, dtype=torch.long), "known_mask": torch.as_tensor(keep)}
        with self.lock:
            gen = torch.Generator(self.model.lm_head.weight.device).manual_seed(seed)
            try:
                return generate(self.model, **cond, num_samples=num_images, settings=settings, seed=gen,
                                speculative=int(speculative or 0), progress=progress, **extra)
            except ValueError as e:  # e.g. a caption the text tokenizer cannot encode
                raise RequestError(str(e)) from None

    def images(self, codes: torch.Tensor) -> list[Image.Image]:
        """Code grids -> PIL images through the image tokenizer, upscaled for the page."""
        pixels = to_pixels(codes.cpu(), self.layout, self.tokenizer)
        side = max(pixels.shape[-2:])
        return [image_grid(p[None], rows=1, min_size=max(SHOWN_PX, side), pad=0) for p in pixels]

    def encode_upload(self, path: str | Path) -> Edit:
        """An uploaded image file -> an Edit of its codes (every cell kept)."""
        if not hasattr(self.tokenizer, "encode"):
            raise RequestError("this model's image tokenizer cannot encode uploads; start with --tokenizer")
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.tokenizer.channels == 1 else "RGB")
                h, w = self.tokenizer.image_size
                down = im.width >= w and im.height >= h  # area average: exact for our own upscaled images
                im = im.resize((w, h), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError):
            raise RequestError(f"{Path(path).name} is not an image PIL can read; upload a PNG or JPEG") from None
        x = x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]
        return Edit(self.tokenizer.encode(x)[0].cpu().numpy())

    def draw_edit(self, edit: Edit) -> Image.Image:
        """The edited image with a red veil over the cells that will be redrawn."""
        im = self.images(torch.as_tensor(edit.codes)[None])[0].convert("RGB")
        H, W = edit.codes.shape
        rows = (np.arange(im.height) * H // im.height)[:, None]
        cols = (np.arange(im.width) * W // im.width)[None, :]
        veil = ~edit.keep[rows, cols]
        a = np.asarray(im, dtype=np.float32)
        a[veil] = 0.5 * a[veil] + 0.5 * np.array([230.0, 40.0, 40.0])
        return Image.fromarray(a.round().astype(np.uint8))

    def cell_at(self, edit: Edit, x: int, y: int, width: int, height: int) -> tuple[int, int]:
        H, W = edit.codes.shape
        return min(H - 1, max(0, y * H // height)), min(W - 1, max(0, x * W // width))


# ---- the page ---------------------------------------------------------------------------------------------


def build_app(gen: WebGenerator):
    """The Gradio Blocks of the page (``gradio`` imported here: the ``web`` extra)."""
    import gradio as gr

    def decode(edit, class_name, prompt, guidance, schedule, power, temperature, top_k, top_p, order, steps,
               speculative, seed, num_images):
        """Generate (``edit`` None) or redraw ``edit``'s released cells: gallery images and their codes."""
        try:
            s = gen.settings(guidance, schedule, power, temperature, top_k, top_p, order, steps, speculative)
            n, seed = gen.check_count(num_images, seed)
            known = {} if edit is None else {"known": edit.codes, "keep": edit.keep}
            codes = gen.sample(s, seed, n, class_name, prompt or "", speculative, **known)
        except RequestError as e:
            raise gr.Error(" ".join(str(e).split()), print_exception=False) from None
        return gen.images(codes), codes.numpy()

    def run_generate(*values, progress=gr.Progress(track_tqdm=True)):
        return decode(None, *values)

    def redraw(edit, *values, progress=gr.Progress(track_tqdm=True)):
        if edit is None:
            raise gr.Error("pick an image of the gallery or upload one first")
        return decode(edit, *values)

    def pick(codes, evt: gr.SelectData):
        if codes is None:
            raise gr.Error("generate images first")
        edit = Edit(np.asarray(codes)[evt.index].copy())
        return gen.draw_edit(edit), edit

    def upload(path):
        if path is None:
            return gr.skip(), gr.skip()
        try:
            edit = gen.encode_upload(path)
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return gen.draw_edit(edit), edit

    def toggle(edit, image, evt: gr.SelectData):
        if edit is None:
            raise gr.Error("pick an image first")
        r, c = gen.cell_at(edit, *evt.index, image.width, image.height)
        edit.keep[r, c] = ~edit.keep[r, c]
        return gen.draw_edit(edit), edit

    def keep_all(edit, value: bool):
        if edit is None:
            raise gr.Error("pick an image first")
        edit.keep[:] = value
        return gen.draw_edit(edit), edit

    with gr.Blocks(title="rar_llm", analytics_enabled=False) as app:
        c = page(gen, gr)
        settings_in = [c.class_name, c.prompt, c.guidance, c.schedule, c.power, c.temperature, c.top_k, c.top_p,
                       c.order, c.steps, c.speculative, c.seed, c.num_images]
        shown = [c.shown_edit, c.edit]
        c.button.click(run_generate, settings_in, [c.gallery, c.codes], api_name="generate", concurrency_id="model")
        c.redraw_button.click(redraw, [c.edit, *settings_in], [c.gallery, c.codes], api_name=False,
                              concurrency_id="model")
        c.gallery.select(pick, c.codes, shown, api_name=False)
        c.upload_file.upload(upload, c.upload_file, shown, api_name=False)
        c.shown_edit.select(toggle, [c.edit, c.shown_edit], shown, api_name=False)
        c.all_button.click(lambda e: keep_all(e, True), c.edit, shown, api_name=False)
        c.none_button.click(lambda e: keep_all(e, False), c.edit, shown, api_name=False)
    return app


def page(gen: WebGenerator, gr) -> SimpleNamespace:
    """The page's components, laid out inside the open ``gr.Blocks``: settings left, images right."""
    L, c = gen.layout, SimpleNamespace()
    gr.Markdown(f"## rar_llm: {L.num_classes} classes, {L.height}x{L.width} codes of {L.codebook_size}")
    c.codes, c.edit = gr.State(None), gr.State(None)
    number = dict(min_width=80)
    with gr.Row():
        with gr.Column(scale=1):
            c.class_name = gr.Dropdown(gen.class_names, value=gen.class_names[0], label="class",
                                       allow_custom_value=True)
            c.prompt = gr.Textbox(label="caption (instead of the class)", visible=bool(L.text_vocab_size))
            with gr.Row():
                c.guidance = gr.Number(2.0, label="guidance (1: none)", elem_id="guidance", **number)
                c.schedule = gr.Dropdown(list(SCHEDULES), value="constant", label="schedule", **number)
                c.power = gr.Number(0.0, label="power", **number)
            with gr.Row():
                c.temperature = gr.Number(1.0, label="temperature", **number)
                c.top_k = gr.Number(0, label="top-k (0: off)", precision=0, **number)
                c.top_p = gr.Number(1.0, label="top-p (1: off)", **number)
            with gr.Row():
                c.order = gr.Dropdown(list(ORDERS), value="raster", label="order", **number)
                c.steps = gr.Number(0, label="parallel steps (0: off)", precision=0, **number)
                c.speculative = gr.Number(0, label="speculative (0: off)", precision=0, **number)
            with gr.Row():
                c.seed = gr.Number(0, label="seed", precision=0, **number)
                c.num_images = gr.Number(8, label=f"images (1-{gen.max_images})", precision=0, **number)
            c.button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            c.gallery = gr.Gallery(label="samples (click one to inpaint it)", columns=4, elem_id="gallery",
                                   object_fit="contain", format="png", allow_preview=False, height=400)
            with gr.Row():
                c.shown_edit = gr.Image(label="inpaint: click cells to keep (clear) or redraw (red)",
                                        interactive=False, type="pil", format="png", elem_id="edit", height=300)
                with gr.Column():
                    c.upload_file = gr.File(label="or upload an image", type="filepath", height=120)
                    c.all_button = gr.Button("keep every cell")
                    c.none_button = gr.Button("redraw every cell")
                    c.redraw_button = gr.Button("Redraw the red cells", variant="primary", elem_id="redraw")
    return c


def web(
    checkpoint_dir: Path,
    tokenizer: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_images: int = 16,
    device: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> None:
    """Serve a page to try a checkpoint in the browser: class, guidance, order, seed, inpainting.

    Args:
        checkpoint_dir: a litgpt checkpoint folder of rar_llm (``train/final``, or ``rar-llm init``'s).
        tokenizer: the image tokenizer that decodes the codes (a ``rar_llm.tokenizers`` name or weights
            file: ``maskgit-vqgan`` for ImageNet layouts, the ``rar-llm train-vq`` file for Fashion-MNIST);
            None draws the digits' 17 grey levels and refuses other codebooks.
        host: the address to bind (localhost by default; ``0.0.0.0`` opens it to the network).
        port: the port (0: a free one).
        max_images: the most images one request may ask for.
        device, dtype: where the model runs and its weights dtype (as ``rar-llm sample``).
    """
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ImportError(f"rar-llm web needs Gradio ({err}); pip install 'rar-llm[web]'") from None
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port} must be in 0..65535 (0: a free port)")
    if max_images < 1:
        raise ValueError(f"--max_images {max_images} must be >= 1")
    if isinstance(tokenizer, str):
        from rar_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    gen = WebGenerator(Path(checkpoint_dir), tokenizer, device, None if dtype == "auto" else DTYPES[dtype], max_images)
    app = build_app(gen)
    app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port or None, show_error=True,
                                                  quiet=False)
