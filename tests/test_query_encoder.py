"""The light query encoder gives the vectors sentence-transformers gives, without loading torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

from recsys.catalog.embedding import resolve_model_path
from recsys.catalog.query_encoder import light_encoder_for

QUERIES = ["lantern", "BAG CHARM", "a garden party next week", "cakestand, 3 tier! crème brûlée", "x" * 2000]


def test_light_encoder_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path("all-MiniLM-L6-v2")
    light = light_encoder_for(path)
    assert light is not None
    ours = light.encode(QUERIES)
    reference = SentenceTransformer(path, device="cpu").encode(QUERIES, normalize_embeddings=True)
    assert ours.dtype == np.float32 and ours.shape == (len(QUERIES), 384)
    assert np.abs(ours - reference).max() < 3e-6
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_light_encoder_loads_no_torch():
    code = (
        "import sys; from recsys.catalog.embedding import resolve_model_path;"
        "from recsys.catalog.query_encoder import light_encoder_for;"
        "v = light_encoder_for(resolve_model_path('all-MiniLM-L6-v2')).encode(['lantern']);"
        "print(v.shape, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "(1, 384) False False"


def test_other_model_shapes_are_left_to_sentence_transformers(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(resolve_model_path("all-MiniLM-L6-v2"), folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    assert light_encoder_for(str(folder)) is None
    assert light_encoder_for(str(tmp_path / "missing")) is None

