"""`llm-listwise`: the notebook's few-shot reranking prompt, generated and repaired.

The model writes a numbered list (optionally with a reason per line). The list is parsed
back onto the candidates it was shown; invented items and repeats are dropped and missing
ones appended, so the result is always a permutation whatever the model wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

from recsys.llm.inference import encode_prompt, generate_greedy
from recsys.llm.parsing import parse_ranked_list
from recsys.llm.prompts import LISTWISE_ANSWER_PREFIX, listwise_prompt
from recsys.rankers.base import RankResult
from recsys.rankers.llm_common import LLMRanker, PreparedRequest

ANSWER_START = LISTWISE_ANSWER_PREFIX.rsplit("\n", 1)[-1]
REASON_TOKENS = 24
LINE_OVERHEAD_TOKENS = 4
SLACK_TOKENS = 8


class ListwiseRanker(LLMRanker):
    name = "llm-listwise"

    def new_token_budget(self, item: PreparedRequest) -> int:
        """Enough tokens for every shown candidate's line (and reason), not more."""
        per_line = LINE_OVERHEAD_TOKENS + (REASON_TOKENS if item.request.explain else 0)
        return sum(item.name_tokens) + per_line * len(item.shown) + SLACK_TOKENS

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        sequences = [
            encode_prompt(
                self.model,
                listwise_prompt(item.case, explain=item.request.explain),
                LISTWISE_ANSWER_PREFIX,
                chat=True,
            )
            for item in prepared
        ]
        generations = generate_greedy(
            self.model,
            sequences,
            max_new_tokens=[self.new_token_budget(item) for item in prepared],
            stop_after_lines=[len(item.shown) for item in prepared],
            stop_loops=True,
        )
        results = []
        for item, sequence, generation in zip(prepared, sequences, generations, strict=True):
            text = ANSWER_START + generation.text
            parsed = parse_ranked_list(text, item.case.candidates)
            codes = item.shown_codes
            order = [codes[position] for position in parsed.order]
            count = len(order)
            scores = {code: (count - rank) / count for rank, code in enumerate(order)}
            explanations = None
            if item.request.explain:
                explanations = {codes[position]: reason for position, reason in parsed.explanations.items()}
            results.append(
                self.complete(
                    item,
                    order,
                    scores,
                    explanations=explanations,
                    raw_output=text,
                    repaired=parsed.repaired,
                    fallback=parsed.fallback,
                    info={
                        "prompt_tokens": len(sequence),
                        "generated_tokens": generation.new_tokens,
                        "matched": parsed.matched,
                        "unknown_items": len(parsed.unknown),
                        "duplicates": parsed.duplicates,
                        "missing": parsed.missing,
                    },
                )
            )
        return results
