"""`llm-pointwise`: the course's ranker, one "Probability:" prompt per candidate.

Each candidate is scored on its own; the few generated tokens must hold a number in [0, 1],
and anything else scores 0 and is counted in `info["parse_failures"]`.
"""

from __future__ import annotations

from collections.abc import Sequence

from recsys.llm.inference import encode_prompt, generate_greedy
from recsys.llm.parsing import parse_probability
from recsys.llm.prompts import POINTWISE_ANSWER_PREFIX, pointwise_prompt
from recsys.rankers.base import RankResult
from recsys.rankers.llm_common import LLMRanker, PreparedRequest

PROBABILITY_TOKENS = 8
FAILURE_SCORE = 0.0


class PointwiseRanker(LLMRanker):
    name = "llm-pointwise"

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        sequences = [
            encode_prompt(self.model, pointwise_prompt(item.case, name), POINTWISE_ANSWER_PREFIX, chat=True)
            for item in prepared
            for name in item.case.candidates
        ]
        lengths = iter([len(sequence) for sequence in sequences])
        generations = iter(
            generate_greedy(self.model, sequences, max_new_tokens=PROBABILITY_TOKENS, stop_after_lines=1)
        )
        results = []
        for item in prepared:
            scores: dict[str, float] = {}
            lines = []
            failures = 0
            prompt_tokens = 0
            for code in item.shown_codes:
                prompt_tokens += next(lengths)
                text = next(generations).text
                value = parse_probability(text)
                if value is None:
                    failures += 1
                    value = FAILURE_SCORE
                scores[code] = value
                lines.append(f"{code}: {text.strip()[:40]}")
            order = sorted(item.shown_codes, key=lambda code: -scores[code])
            results.append(
                self.complete(
                    item,
                    order,
                    scores,
                    raw_output="\n".join(lines),
                    repaired=bool(failures),
                    fallback=failures == len(item.shown),
                    info={"parse_failures": failures, "prompt_tokens": prompt_tokens},
                )
            )
        return results
