"""`learned` and `learned-llm`: a LightGBM LambdaRank model over per-candidate features.

The model is trained by `recsys train ranker` (recsys/rankers/training.py) and kept as one JSON
file per variant in the model cache (`<model cache>/rankers/<variant>.json`: format, metadata and
the booster's text). A retrain replaces the file atomically; a process loads it once and loads it
again only when the file changes, and the file's content hash is the model version that goes
into the result cache key. A missing, unreadable or foreign model file is an error naming the
command to run: these rankers never fall back silently to another order.

`learned` is cheap, so it orders every merged candidate (up to `RECSYS_RETRIEVE_K`), not only
the window an LLM ranker sees. `learned-llm` adds the zero-shot `llm-likelihood` score of the
candidates in the ranked window (`RECSYS_MAX_CANDIDATES`) as one more feature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.config import Settings
from recsys.rankers.base import RankRequest, RankResult
from recsys.rankers.common import empty_result, score_dump, unique_candidates
from recsys.rankers.features import feature_names, read_features

log = logging.getLogger(__name__)

VARIANTS = ("learned", "learned-llm")
MODEL_FORMAT = 1
LLM_SCORER = "llm-likelihood"
TRAIN_COMMAND = "recsys train ranker"
CONTRIBUTIONS_SHOWN = 3  # features per item
CONTRIBUTION_ITEMS = 10  # first items of an explained result that get them


class ModelFileError(ValueError):
    """A model file that cannot be served: missing, unreadable, or trained for other features."""


class ModelNotTrainedError(ModelFileError):
    """No model file for the variant yet."""


def model_path(settings: Settings, variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown learned ranker {variant!r}; choose one of {', '.join(VARIANTS)}")
    return settings.models_dir / "rankers" / f"{variant}.json"


def train_command(variant: str) -> str:
    return TRAIN_COMMAND if variant == "learned" else f"{TRAIN_COMMAND} --variant {variant}"


@dataclass(frozen=True)
class RankerModel:
    """A loaded model: the booster, what it was trained on, and its version (content hash)."""

    variant: str
    booster: object  # lightgbm.Booster
    metadata: dict
    version: str
    path: Path

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.metadata["features"])

    def importances(self) -> dict[str, float]:
        """Share of the total split gain per feature, largest first (sums to 1)."""
        gains = self.booster.feature_importance(importance_type="gain")
        total = float(np.sum(gains)) or 1.0
        shares = {name: float(gain) / total for name, gain in zip(self.features, gains, strict=True)}
        return dict(sorted(shares.items(), key=lambda item: -item[1]))


def _content_version(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


def write_model(path: Path, booster, metadata: dict) -> str:
    """Write the model file atomically (temp file in the same folder, fsync, rename); returns its version."""
    if list(metadata.get("features", [])) != list(booster.feature_name()):
        raise ValueError("metadata features do not match the booster's features")
    content = json.dumps(
        {"format": MODEL_FORMAT, "metadata": metadata, "model": booster.model_to_string()}, sort_keys=True
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(content)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return _content_version(content)


def read_model(path: Path, variant: str) -> RankerModel:
    """Load and check a model file; ModelFileError (naming the command to run) when it cannot be served."""
    import lightgbm

    command = train_command(variant)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotTrainedError(
            f"ranker {variant!r} has no trained model ({path} is missing): run `{command}`"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the {variant} model {path}: {exc}; run `{command}`") from exc
    try:
        data = json.loads(content)
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {MODEL_FORMAT}")
        metadata = data["metadata"]
        booster = lightgbm.Booster(model_str=data["model"])
    except (ValueError, KeyError, TypeError, lightgbm.basic.LightGBMError) as exc:
        raise ModelFileError(f"the {variant} model {path} is corrupt ({exc}): run `{command}` again") from exc
    expected = list(feature_names(with_llm=variant == "learned-llm"))
    if metadata.get("variant") != variant or list(metadata.get("features", [])) != expected \
            or booster.feature_name() != expected:
        raise ModelFileError(
            f"the {variant} model {path} was trained for other features "
            f"({metadata.get('variant')!r}: {', '.join(metadata.get('features', []))}); run `{command}` again"
        )
    return RankerModel(variant, booster, metadata, _content_version(content), path)


_versions: dict[tuple[str, int, int], str] = {}
_versions_lock = threading.Lock()


def _file_state(path: Path, variant: str) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelNotTrainedError(
            f"ranker {variant!r} has no trained model ({path} is missing): run `{train_command(variant)}`"
        ) from None
    return str(path), stat.st_mtime_ns, stat.st_size


def model_version(settings: Settings, variant: str) -> str:
    """The current model file's version, for the result cache key (hashed once per file change)."""
    path = model_path(settings, variant)
    state = _file_state(path, variant)
    with _versions_lock:
        version = _versions.get(state)
    if version is None:
        version = read_model(path, variant).version
        with _versions_lock:
            _versions[state] = version
    return version


def llm_scorer(settings: Settings, model=None):
    """The zero-shot LLM ranker whose scores `learned-llm` uses as a feature (loads the LLM once)."""
    from recsys.rankers import get_ranker

    return get_ranker(LLM_SCORER, settings=settings, model=model)


def window_scores(scorer, requests: Sequence[RankRequest], settings: Settings) -> list[dict[str, float]]:
    """The scorer's scores of each request's ranked window (its first `RECSYS_MAX_CANDIDATES` candidates)."""
    window = [
        RankRequest(candidates=list(r.candidates)[: settings.max_candidates], history=r.history,
                    query=r.query, customer_id=r.customer_id)
        for r in requests
    ]
    return [result.scores for result in scorer.rank(window)] if window else []


class LearnedRanker:
    """Orders every candidate by the model's score; retrieval order breaks ties.

    With `explain`, a result's info holds, for its first items, the features that moved each
    score most (LightGBM's per-feature contributions), for grounded explanations.
    """

    uses_llm = False
    ranks_all_candidates = True

    def __init__(self, settings: Settings, variant: str = "learned", llm_model=None) -> None:
        self.settings = settings
        self.name = variant
        self.path = model_path(settings, variant)
        self._llm_model = llm_model
        self._llm_ranker = None
        self._lock = threading.Lock()
        self._state: tuple[str, int, int] | None = None
        self._model: RankerModel | None = None
        self.model()

    def model(self) -> RankerModel:
        """The loaded model, reloaded when the file changed since (a nightly retrain)."""
        state = _file_state(self.path, self.name)
        with self._lock:
            if self._model is None or state != self._state:
                self._model = read_model(self.path, self.name)
                self._state = state
                log.info("loaded %s model %s (%s)", self.name, self._model.version, self.path)
            return self._model

    def _llm_scores(self, requests: Sequence[RankRequest]) -> list[dict[str, float]]:
        if self._llm_ranker is None:
            self._llm_ranker = llm_scorer(self.settings, self._llm_model)
        return window_scores(self._llm_ranker, requests, self.settings)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        model = self.model()
        requests = [
            RankRequest(candidates=unique_candidates(r.candidates), history=r.history, query=r.query,
                        customer_id=r.customer_id, explain=r.explain)
            for r in requests
        ]
        answered = [r for r in requests if r.candidates]
        llm_scores = self._llm_scores(answered) if model.variant == "learned-llm" and answered else None
        features = read_features(answered, self.settings, llm_scores=llm_scores)
        stacked = features.stacked()
        predictions = model.booster.predict(stacked) if len(stacked) else np.empty(0)
        explained = [r.explain for r in answered]
        contributions = self._contributions(model, features, explained) if any(explained) else {}
        results, offset = [], 0
        answered_index = 0
        for request in requests:
            if not request.candidates:
                results.append(empty_result(model_version=model.version))
                continue
            count = len(request.candidates)
            scores_array = predictions[offset:offset + count]
            offset += count
            codes = [c.stock_code for c in request.candidates]
            positions = sorted(range(count), key=lambda i: (-float(scores_array[i]), i))
            order = [codes[i] for i in positions]
            scores = {code: float(score) for code, score in zip(codes, scores_array, strict=True)}
            info = {"model_version": model.version, "ranked": count}
            if answered_index in contributions:
                by_row = contributions[answered_index]
                info["contributions"] = {codes[i]: by_row[i] for i in positions[:CONTRIBUTION_ITEMS]
                                         if i in by_row}
            answered_index += 1
            results.append(RankResult(order=order, scores=scores, raw_output=score_dump(scores, order[:20]),
                                      info=info))
        return results

    def _contributions(self, model: RankerModel, features, explained: Sequence[bool]) -> dict[int, dict]:
        """Per explained request: row → the features that moved its score most, with their contribution."""
        rows = [m for m, wanted in zip(features.matrices, explained, strict=True) if wanted]
        if not rows:
            return {}
        values = model.booster.predict(np.vstack(rows), pred_contrib=True)[:, :-1]
        out, offset = {}, 0
        for index, (matrix, wanted) in enumerate(zip(features.matrices, explained, strict=True)):
            if not wanted:
                continue
            block = values[offset:offset + len(matrix)]
            offset += len(matrix)
            per_row = {}
            for row, contribution in enumerate(block):
                top = np.argsort(-np.abs(contribution))[:CONTRIBUTIONS_SHOWN]
                per_row[row] = {
                    model.features[i]: {"contribution": round(float(contribution[i]), 4),
                                        "value": None if np.isnan(matrix[row, i]) else round(float(matrix[row, i]), 4)}
                    for i in top if contribution[i]
                }
            out[index] = per_row
        return out
