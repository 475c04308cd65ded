"""`llm-likelihood`: how naturally each candidate's name follows the customer's story.

Scores are the mean token log-probability of the description after a history (and query)
prompt: no generation and nothing to parse. The mean, not the sum, so long names are not
punished for their length. Each request's prompt runs once and its key/value cache is shared
by all its candidates (where the model's cache allows; otherwise every pair runs in full).
"""

from __future__ import annotations

from collections.abc import Sequence

from recsys.config import Settings
from recsys.llm.inference import (
    continuation_logprobs,
    encode_prompt,
    shared_prompt_logprobs,
    supports_shared_prompts,
)
from recsys.llm.loading import LoadedModel
from recsys.llm.prompts import likelihood_prompt
from recsys.rankers.base import RankResult
from recsys.rankers.common import score_dump
from recsys.rankers.llm_common import LLMRanker, PreparedRequest


class LikelihoodRanker(LLMRanker):
    name = "llm-likelihood"

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        super().__init__(model, settings)
        self.share_prompts = supports_shared_prompts(model)

    def _score(self, prompts: list[list[int]], names: list[list[list[int]]]) -> list[list[float]]:
        if self.share_prompts:
            return shared_prompt_logprobs(self.model, prompts, names)
        flat = iter(
            continuation_logprobs(
                self.model,
                [prompt for prompt, tails in zip(prompts, names, strict=True) for _ in tails],
                [tail for tails in names for tail in tails],
            )
        )
        return [[next(flat) for _ in tails] for tails in names]

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        tokenizer = self.model.tokenizer
        prompts = [encode_prompt(self.model, likelihood_prompt(item.case), chat=False) for item in prepared]
        names = [
            tokenizer([" " + name for name in item.case.candidates], add_special_tokens=False)["input_ids"]
            for item in prepared
        ]
        results = []
        for item, prompt, tails, values in zip(prepared, prompts, names, self._score(prompts, names), strict=True):
            scores = dict(zip(item.shown_codes, values, strict=True))
            order = sorted(item.shown_codes, key=lambda code: -scores[code])
            tokens = len(prompt) + sum(len(tail) for tail in tails) if self.share_prompts else sum(
                len(prompt) + len(tail) for tail in tails
            )
            results.append(
                self.complete(
                    item,
                    order,
                    scores,
                    raw_output=score_dump(scores, order),
                    info={"prompt_tokens": tokens, "shared_prompt": self.share_prompts},
                )
            )
        return results
