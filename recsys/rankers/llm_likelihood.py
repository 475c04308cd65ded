"""`llm-likelihood`: how naturally each candidate's name follows the customer's story.

Scores are the mean token log-probability of the description after a history (and query)
prompt: no generation and nothing to parse. The mean, not the sum, so long names are not
punished for their length.
"""

from __future__ import annotations

from collections.abc import Sequence

from recsys.llm.inference import continuation_logprobs, encode_prompt
from recsys.llm.prompts import likelihood_prompt
from recsys.rankers.base import RankResult
from recsys.rankers.common import score_dump
from recsys.rankers.llm_common import LLMRanker, PreparedRequest


class LikelihoodRanker(LLMRanker):
    name = "llm-likelihood"

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        tokenizer = self.model.tokenizer
        prompts, continuations = [], []
        for item in prepared:
            prompt = encode_prompt(self.model, likelihood_prompt(item.case), chat=False)
            names = tokenizer([" " + name for name in item.case.candidates], add_special_tokens=False)
            for ids in names["input_ids"]:
                prompts.append(prompt)
                continuations.append(ids)
        scores_flat = iter(continuation_logprobs(self.model, prompts, continuations))
        results = []
        for item in prepared:
            scores = {code: next(scores_flat) for code in item.shown_codes}
            order = sorted(item.shown_codes, key=lambda code: -scores[code])
            results.append(self.complete(item, order, scores, raw_output=score_dump(scores, order)))
        return results
