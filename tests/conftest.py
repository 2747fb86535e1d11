"Shared offline fixtures: a tiny open_clip model written to disk and loaded back, and small in-memory images."
import os

# Before anything imports litellm / huggingface_hub / datasets: no network, no remote price map.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest

from spa_toolkit.backbone import load_clip
from spa_toolkit.fixtures import TINY_ARCH, WEIGHTS_FILE, make_tiny_clip, tiny_images as _tiny_images


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    "Folder of the tiny CLIP (open_clip_config.json + weights), loadable as 'local-dir:<folder>'."
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip_file(tiny_clip_dir):
    "The tiny CLIP's single weights file, loadable as pretrained=<file> with arch TINY_ARCH."
    return tiny_clip_dir / WEIGHTS_FILE


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_file):
    "The tiny CLIP loaded through load_clip from its weights file (shared: do not modify)."
    return load_clip(TINY_ARCH, tiny_clip_file)


@pytest.fixture(scope="session")
def tiny_images():
    "Eight 32-pixel RGB PIL images."
    return _tiny_images(8, size=32, seed=0)
