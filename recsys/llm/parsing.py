"""Turn free model text into something safe: a permutation of candidates, or a probability.

Nothing here raises on bad output. A ranked list is mapped line by line onto the candidates
the model was shown; anything else (invented products, repeats, prose, injected text) is
dropped, and what the model left out is appended in retrieval order.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from recsys.llm.prompts import one_line

MAX_REASON_CHARS = 200
FUZZY_MATCH_THRESHOLD = 0.85

_ITEM_LINE = re.compile(r"^(?:(\d{1,4})\s*[.):\]]|[-*\u2022])\s*(.*)$")
_NUMBER_REFERENCE = re.compile(
    r"^(?:#|no\.?|item|product|option)?\s*\[?(\d{1,4})\]?\s*(?:[-:\u2013\u2014]\s*(.*))?$", re.I
)
_REASON_SEPARATORS = (" - ", " \u2013 ", " \u2014 ", ": ", " (", " because ", ", ")
_NON_ALPHANUMERIC = re.compile(r"[\W_]+")
_PROBABILITY_MARKER = re.compile(r"probability\s*[:=]", re.I)
_LEADING_NUMBER = re.compile(r"\s*[*`\"']*\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?![\w%])")


_LEADING_LIST_NUMBER = re.compile(r"^\s*\d+\s*[.)]\s*")
REPEATED_LINES_TO_STOP = 2


def ends_in_a_loop(text: str, repeats: int = REPEATED_LINES_TO_STOP) -> bool:
    """True when the last `repeats` complete lines each repeat an earlier line (numbering aside).

    Small models fall into writing one list item over and over; nothing after that is used.
    """
    lines = [_LEADING_LIST_NUMBER.sub("", line).strip().casefold() for line in text.split("\n")[:-1]]
    if len(lines) <= repeats:
        return False
    return all(lines[i] in lines[:i] for i in range(len(lines) - repeats, len(lines)))


def normalize_name(text: str) -> str:
    """Case, punctuation and spacing removed: 'Cakestand, 3 tier' == 'CAKESTAND 3 TIER'."""
    return _NON_ALPHANUMERIC.sub(" ", text.casefold()).strip()


@dataclass
class ParsedRanking:
    """A full permutation of candidate indices and what had to be fixed to get it."""

    order: list[int]
    explanations: dict[int, str] = field(default_factory=dict)
    matched: int = 0
    unknown: list[str] = field(default_factory=list)
    duplicates: int = 0
    missing: int = 0
    repaired: bool = False
    fallback: bool = False


class _NameIndex:
    """Looks up candidate indices by displayed name, preferring ones not yet used."""

    def __init__(self, names: Sequence[str]) -> None:
        self.normalized = [normalize_name(name) for name in names]
        self.by_name: dict[str, list[int]] = {}
        for index, key in enumerate(self.normalized):
            self.by_name.setdefault(key, []).append(index)
        self.longest_first = sorted(
            (key for key in self.by_name if key), key=len, reverse=True
        )

    def exact(self, text: str, used: set[int]) -> int | None:
        indices = self.by_name.get(normalize_name(text))
        if not indices or not normalize_name(text):
            return None
        return next((i for i in indices if i not in used), indices[0])

    def prefix(self, text: str, used: set[int]) -> tuple[int, str] | None:
        """The longest name that `text` starts with, and the raw text after it."""
        key = normalize_name(text)
        for name in self.longest_first:
            if key != name and not key.startswith(name + " "):
                continue
            indices = self.by_name[name]
            index = next((i for i in indices if i not in used), indices[0])
            for cut in range(1, len(text) + 1):
                at_boundary = cut == len(text) or not text[cut].isalnum()
                if at_boundary and normalize_name(text[:cut]) == name:
                    return index, text[cut:]
        return None

    def fuzzy(self, text: str, used: set[int]) -> int | None:
        key = normalize_name(text)
        if not key:
            return None
        best_index, best_ratio = None, FUZZY_MATCH_THRESHOLD
        for index, name in enumerate(self.normalized):
            ratio = difflib.SequenceMatcher(None, key, name).ratio()
            if ratio > best_ratio or (ratio == best_ratio and best_index in used and index not in used):
                best_index, best_ratio = index, ratio
        return best_index


def _clean_reason(text: str) -> str:
    reason = one_line(text).strip(" -\u2013\u2014:;,.()*\"'")
    return reason[:MAX_REASON_CHARS]


def _strip_decoration(text: str) -> str:
    return text.strip().strip("*_`\"'").strip()


def _match_item(body: str, names: _NameIndex, count: int, used: set[int]) -> tuple[int, str] | None:
    """The candidate a list line names, with any reason written after it."""
    body = _strip_decoration(body)
    if not body:
        return None
    index = names.exact(body, used)
    if index is not None:
        return index, ""
    for separator in _REASON_SEPARATORS:
        start = body.find(separator)
        while start > 0:
            index = names.exact(body[:start], used)
            if index is not None:
                return index, _clean_reason(body[start + len(separator):])
            start = body.find(separator, start + 1)
    reference = _NUMBER_REFERENCE.match(body)
    if reference and 1 <= int(reference.group(1)) <= count:
        return int(reference.group(1)) - 1, _clean_reason(reference.group(2) or "")
    found = names.prefix(body, used)
    if found is not None:
        return found[0], _clean_reason(found[1])
    name_part = re.split(r" [-\u2013\u2014] |: ", body, maxsplit=1)
    index = names.fuzzy(name_part[0], used)
    if index is not None:
        return index, _clean_reason(name_part[1] if len(name_part) > 1 else "")
    return None


def parse_ranked_list(text: str | None, names: Sequence[str]) -> ParsedRanking:
    """Map a generated numbered list onto `names` (the candidates as shown, in retrieval order).

    The list ends at the first blank line or prose line after an item, or where numbering
    restarts at 1 (a model carrying on with an invented next case).
    """
    count = len(names)
    index = _NameIndex(names)
    order: list[int] = []
    used: set[int] = set()
    result = ParsedRanking(order=order)
    items_seen = 0
    for raw_line in (text or "").splitlines():
        line = _strip_decoration(raw_line)
        if not line:
            if items_seen:
                break
            continue
        item = _ITEM_LINE.match(line)
        if item and item.group(1) == "1" and items_seen:
            break
        body = item.group(2) if item else line
        found = _match_item(body, index, count, used)
        if found is None:
            if item is None:
                if items_seen:
                    break
                continue
            items_seen += 1
            if body.strip():
                result.unknown.append(one_line(body)[:MAX_REASON_CHARS])
            continue
        items_seen += 1
        position, reason = found
        if position in used:
            result.duplicates += 1
            continue
        used.add(position)
        order.append(position)
        if reason:
            result.explanations[position] = reason
    result.matched = len(order)
    if not order:
        result.order = list(range(count))
        result.fallback = count > 0
        result.missing = count
        return result
    missing = [position for position in range(count) if position not in used]
    order.extend(missing)
    result.missing = len(missing)
    result.repaired = bool(result.unknown or result.duplicates or missing)
    return result


def parse_probability(text: str | None) -> float | None:
    """The number after 'Probability:' (or at the start of the text) if it lies in [0, 1]."""
    if not text:
        return None
    marker = _PROBABILITY_MARKER.search(text)
    rest = text[marker.end():] if marker else text
    number = _LEADING_NUMBER.match(rest)
    if number is None:
        return None
    try:
        value = float(number.group(1))
    except ValueError:
        return None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return None
    return value
