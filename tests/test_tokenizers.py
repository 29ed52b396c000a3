import re
import sys

import numpy as np
import pytest
import torch

from rar_llm.tokenizers import ImageTokenizer, MaskGITVQGAN, PixelTokenizer, load_tokenizer
from rar_llm.tokenizers.maskgit import Quantizer, ResBlock

# The released file's key layout (FACTS.md section 2), as patterns every key must match.
OFFICIAL_KEYS = [
    r"encoder\.conv_in\.weight",
    r"encoder\.down\.[0-4]\.block\.[01]\.(norm1|norm2)\.(weight|bias)",
    r"encoder\.down\.[0-4]\.block\.[01]\.(conv1|conv2|nin_shortcut)\.weight",
    r"encoder\.mid\.[01]\.(norm1|norm2)\.(weight|bias)",
    r"encoder\.mid\.[01]\.(conv1|conv2)\.weight",
    r"encoder\.norm_out\.(weight|bias)",
    r"encoder\.conv_out\.(weight|bias)",
    r"decoder\.conv_in\.(weight|bias)",
    r"decoder\.mid\.[01]\.(norm1|norm2)\.(weight|bias)",
    r"decoder\.mid\.[01]\.(conv1|conv2)\.weight",
    r"decoder\.up\.[0-4]\.block\.[01]\.(norm1|norm2)\.(weight|bias)",
    r"decoder\.up\.[0-4]\.block\.[01]\.(conv1|conv2|nin_shortcut)\.weight",
    r"decoder\.up\.[1-4]\.upsample_conv\.(weight|bias)",
    r"decoder\.norm_out\.(weight|bias)",
    r"decoder\.conv_out\.(weight|bias)",
    r"quantize\.embedding\.weight",
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised MaskGIT-VQGAN saved like the released file: a plain state dict."""
    torch.manual_seed(0)
    model = MaskGITVQGAN()
    path = tmp_path_factory.mktemp("maskgit") / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_maskgit_has_the_official_layout():
    with torch.device("meta"):
        state = MaskGITVQGAN().state_dict()
    assert len(state) == 168
    assert sum(v.numel() for v in state.values()) == pytest.approx(54.5e6, rel=2e-3)
    for key in state:
        assert any(re.fullmatch(p, key) for p in OFFICIAL_KEYS), key
    assert state["quantize.embedding.weight"].shape == (1024, 256)
    assert state["encoder.conv_out.weight"].shape == (256, 512, 1, 1)
    assert state["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    shortcuts = sorted(k.rsplit(".", 3)[0] for k in state if "nin_shortcut" in k)
    assert shortcuts == ["decoder.up.1.block", "decoder.up.3.block", "encoder.down.2.block", "encoder.down.4.block"]
    assert state["decoder.up.3.block.0.conv1.weight"].shape == (256, 512, 3, 3)  # up levels run from 4 down to 0


def test_maskgit_loads_encodes_and_decodes(weights, device):
    path, state = weights
    tok = load_tokenizer("maskgit-vqgan", weights=path)
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.grid, tok.image_size, tok.channels) == (1024, (16, 16), (256, 256), 3)
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in tok.parameters())
    assert isinstance(load_tokenizer(path), MaskGITVQGAN)  # a weights file stands for its tokenizer

    tok = tok.to(device)
    codes = tok.encode(torch.rand(1, 3, 256, 256))
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 1024
    images = tok.decode(codes)
    assert images.shape == (1, 3, 256, 256) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1

    with pytest.raises(ValueError, match=r"float images \(B, 3, 256, 256\)"):
        tok.encode(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="code 1024 is outside"):
        tok.decode(torch.full((1, 16, 16), 1024))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("encoder.conv_out.bias"), r"1 missing keys: encoder\.conv_out\.bias"),
        (lambda s: s.update({"quantize.embedding.weight": torch.zeros(512, 256)}),
         r"wrong shapes: quantize\.embedding\.weight \(512, 256\) \(expected \(1024, 256\)\)"),
        (lambda s: s.update({"quantize.extra": torch.zeros(1)}), r"1 unexpected keys: quantize\.extra"),
    ],
)
def test_maskgit_refuses_a_wrong_state_dict(tmp_path, weights, edit, message):
    state = dict(weights[1])
    edit(state)
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as e:
        MaskGITVQGAN.from_pretrained(path)
    assert str(path) in str(e.value)


def test_maskgit_refuses_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="fun-research/TiTok"):
        MaskGITVQGAN.from_pretrained(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin is not a readable torch state dict"):
        MaskGITVQGAN.from_pretrained(tmp_path / "junk.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="holds a list, not a plain state dict"):
        MaskGITVQGAN.from_pretrained(tmp_path / "list.bin")


def test_maskgit_download_offline_says_what_to_do(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="no network.*weights=PATH"):
        load_tokenizer("maskgit-vqgan")


def test_maskgit_download_without_huggingface_hub_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        load_tokenizer("maskgit-vqgan")


def test_quantizer_picks_the_nearest_code():
    torch.manual_seed(0)
    q = Quantizer()
    z = torch.randn(2, 256, 3, 5)
    codes = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 256).double()
    brute = ((flat[:, None] - q.embedding.weight.double()[None]) ** 2).sum(-1)
    assert torch.equal(codes.reshape(-1), brute.argmin(1))
    assert torch.equal(q.lookup(codes), q.embedding.weight[codes].permute(0, 3, 1, 2))


def test_resblock_shortcut_takes_the_output_path():
    """The trained quirk: a widening block's residual is nin_shortcut(output), so a zero output stays zero."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 4, 4)
    for block, expected in ((ResBlock(32, 64), torch.zeros(1, 64, 4, 4)), (ResBlock(32, 32), x)):
        with torch.no_grad():
            block.conv2.weight.zero_()
        assert torch.allclose(block(x), expected)


def test_grey_pixel_tokenizer_is_exact():
    tok = load_tokenizer("digits")
    assert (tok.codebook_size, tok.grid, tok.image_size, tok.channels) == (17, (8, 8), (8, 8), 1)
    codes = torch.randint(0, 17, (4, 8, 8))
    images = tok.decode(codes)
    assert images.shape == (4, 1, 8, 8)
    assert torch.equal(images[:, 0], codes / 16)
    assert torch.equal(tok.encode(images), codes)
    assert torch.equal(tok.encode((images + 0.02).clamp(0, 1)), codes)  # nearest level, not truncation

    tok = load_tokenizer("pixel", image_size=(3, 5))
    x = torch.randint(0, 256, (2, 1, 3, 5))
    assert tok.codebook_size == 256 and tok.grid == (3, 5)
    assert torch.equal(tok.encode(x / 255), x[:, 0])


def test_palette_tokenizer_fits_saves_and_picks_nearest(tmp_path):
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9]])
    images = (colours[torch.randint(0, 3, (6, 4, 4), generator=g)] + 0.02 * torch.randn(6, 4, 4, 3, generator=g))
    images = images.clamp(0, 1).permute(0, 3, 1, 2)
    tok = PixelTokenizer.fit(images, colours=3)
    assert (tok.codebook_size, tok.channels, tok.grid) == (3, 3, (4, 4))
    found = tok.palette[torch.cdist(colours, tok.palette).argmin(1)]
    assert torch.allclose(found, colours, atol=0.02)

    codes = tok.encode(images)
    flat = images.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = ((flat[:, None] - tok.palette[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(codes.reshape(-1), brute)
    assert torch.equal(tok.encode(tok.decode(codes)), codes)

    tok.save(tmp_path / "palette.npy")
    again = load_tokenizer("pixel", weights=tmp_path / "palette.npy", image_size=4)
    assert torch.equal(again.palette, tok.palette)
    assert np.array_equal(load_tokenizer(tmp_path / "palette.npy", image_size=4).palette, tok.palette)


def test_load_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown tokenizer 'vqgan'"):
        load_tokenizer("vqgan")
    with pytest.raises(ValueError, match="needs image_size"):
        load_tokenizer("pixel")
    with pytest.raises(ValueError, match="takes \\(8, 8\\) images"):
        load_tokenizer("digits", image_size=16)
    with pytest.raises(ValueError, match="at least 2 levels"):
        load_tokenizer("pixel", image_size=4, levels=1)
