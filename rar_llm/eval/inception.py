"""FID / IS / precision / recall at 256x256 on NVIDIA's TorchScript of the TF Inception-v3 (2015-12-05).

StyleGAN2-ADA, StyleGAN3 and clean-fid load the same file. It needs only ``torch.jit.load``:
torch-fidelity, pytorch-fid and clean-fid all import torchvision, and the only torchvision for torch
2.13 here is a CUDA build that fails to import on the CPU torch this project pins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rar_llm.eval.metrics import frechet_distance, precision_recall

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)


def load_inception(weights: Path | str | None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """NVIDIA's TorchScript of the TF Inception-v3 (2015-12-05) that FID and IS are defined on."""
    how = (
        f"download {INCEPTION_FILE} (the TF Inception-v3 of 2015-12-05 as TorchScript, the file StyleGAN2-ADA, "
        f"StyleGAN3 and clean-fid use) from {INCEPTION_URL} and pass its path "
        "(`rar-llm evaluate --inception_weights PATH`, or inception_metrics(..., weights=PATH))"
    )
    if weights is None:
        raise FileNotFoundError(f"no Inception weights given: {how}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path}: {how}")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(
            f"{path} is not a TorchScript file ({str(e).splitlines()[0]}); pytorch-fid's pt_inception-*.pth and "
            f"torch-fidelity's weights are state dicts and do not load here: {how}"
        ) from e


@torch.inference_mode()
def inception_outputs(
    detector: torch.jit.ScriptModule, images: np.ndarray, batch_size: int = 50, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features ``(N, 2048)`` and class probabilities ``(N, 1008)`` of uint8 images ``(N, H, W, C)``.

    The detector resizes to 299x299 itself. Probabilities leave out the output bias, as the original
    Inception Score code did (and StyleGAN's port of it).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (N, H, W, 1 or 3), got {images.shape} {images.dtype}; "
            "convert decoded (B, C, H, W) floats in [0, 1] with to_uint8"
        )
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
        # two passes: the TorchScript returns either the features or the probabilities
        feats.append(detector(x, return_features=True).double().cpu())
        probs.append(detector(x, no_output_bias=True).double().cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def inception_score(probs: np.ndarray, splits: int = 10) -> float:
    """``exp E_x KL(p(y|x) || p(y))``, averaged over ``splits`` parts as the original code did."""
    scores = []
    for part in np.array_split(torch.as_tensor(probs, dtype=torch.float64), min(splits, len(probs))):
        marginal = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded ``(B, C, H, W)`` floats in [0, 1] -> uint8 ``(B, H, W, C)``, as sample files store them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def inception_metrics(
    samples: np.ndarray,
    reference: np.ndarray,
    weights: Path | str | None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    splits: int = 10,
    k: int = 3,
) -> dict:
    """FID, Inception Score, precision and recall of uint8 sample images ``(N, H, W, C)``.

    ``reference`` holds real uint8 images the same way, e.g. ``arr_0`` of ADM's ImageNet 256 reference
    batch (``ADM_REFERENCE_URL``), the one RAR's numbers are measured against. Precision/recall use
    the Inception pool features, as ADM's evaluator does. Numbers are close to, not identical with,
    ADM's TensorFlow evaluator (the resize to 299 differs).
    """
    detector = load_inception(weights, device)
    fake_feats, fake_probs = inception_outputs(detector, samples, batch_size, device)
    real_feats, _ = inception_outputs(detector, reference, batch_size, device)
    precision, recall = precision_recall(real_feats, fake_feats, k)
    return {
        "fid": frechet_distance(fake_feats, real_feats),
        "inception_score": inception_score(fake_probs, splits),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(reference),
    }


def load_images(path: Path) -> np.ndarray:
    """uint8 images ``(N, H, W, C)`` from a ``.npy`` or an ADM-style ``.npz`` (key ``arr_0``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no reference images at {path}; give a .npy or an ADM .npz (arr_0) of uint8 (N, H, W, 3)"
        )
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(
                    f"{path} has no arr_0 (keys {list(f.keys())}); save the images as arr_0, as ADM's reference batches"
                )
            return f["arr_0"]
    return np.load(path, mmap_mode="r", allow_pickle=False)
