"""What a measurement ran on: versions, threads, load and device, recorded beside every benchmark figure."""
from __future__ import annotations

import os
import platform

import numpy as np


def environment(device: str) -> dict:
    import faiss
    import PIL
    import timm
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "timm": timm.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "device": device,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
