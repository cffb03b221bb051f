"""Plain-text analysis of prompts, with no model: words, token counts, the subject phrase, and the
word-level alignment of two prompts that finds a shared description worded differently.

Used by `memflow_nb.prompt_coach` (the checks) and `memflow_nb.prompt_extend` (truncation to the encoder's
limit). Everything here is a heuristic for English prompts written the way MemFlow's advice asks
("<who, described> <does what> <where>, <light>, <camera>"); the coach reports, the user decides.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
from typing import NamedTuple, Optional, Protocol, Sequence

# Determiners and similar words that carry no description: "A keeper" and "The same keeper" name
# the same subject, so alignment ignores them.
DETERMINERS = frozenset("a an the same this that these those his her its their our my your".split())
PREPOSITIONS = frozenset("""in on at into onto through across along over under toward towards to from down up
    past around out off inside outside beside behind near by with without above below between against
    among away forward back about before after beneath beyond during of for like than upon within""".split())
CONJUNCTIONS = frozenset("and or but nor as while".split())
FUNCTION_WORDS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS
# A prompt that starts with one of these names nobody: the text encoder reads each prompt alone.
PRONOUNS = frozenset("he she it they him them his her its their we i".split())
SUBJECT_PRONOUNS = frozenset("he she it".split())  # "He climbs" -> "<subject> climbs" reads right
# Words too common in prompts to say two prompts show the same thing (style and camera vocabulary).
_GENERIC = frozenset("""is are be being was were has have very it he she they him them we i there here
    shot camera cinematic cinematography style realistic photorealistic detailed highly high quality
    wide close closeup medium slow slowly scene view background foreground lighting film frame 4k 8k hd
    soft gentle beautiful""".split())
STOPWORDS = FUNCTION_WORDS | _GENERIC

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?;:]")


class Word(NamedTuple):
    """A word of a prompt: its lower-case form and its character span in the original text."""

    norm: str
    start: int
    end: int


def words(text: str) -> list[Word]:
    """The words of ``text`` (letters and digits, inner apostrophes and hyphens kept), in order."""
    return [Word(m.group().lower().replace("’", "'"), m.start(), m.end()) for m in _WORD.finditer(text)]


def _stem(w: str) -> str:
    # Enough to match "waves" with "wave" and "boats" with "boat"; no more.
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """Stemmed words of ``text`` that say what is shown (no function, style or camera words)."""
    return {_stem(w.norm) for w in words(text) if w.norm not in STOPWORDS and len(w.norm) > 2 and not w.norm.isdigit()}


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the content words of two prompts, in [0, 1] (0 when either has none)."""
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


# ----------------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------------

class CountsTokens(Protocol):
    """What the coach needs of a tokenizer: ``memflow_nb.text_encoder.Tokenizer`` has both."""

    text_len: int

    def count(self, prompts: Sequence[str]) -> list[int]: ...


# The approximation for when no tokenizer is at hand. umT5's sentencepiece vocabulary (256k pieces)
# keeps most English words whole and splits rarer ones in two or three; punctuation marks are
# pieces of their own. Not calibrated against a corpus: treat it as "about".
TOKENS_PER_WORD = 1.3
APPROXIMATION = f"approximate: {TOKENS_PER_WORD} tokens per word + 1 per punctuation mark + </s>"


def approx_tokens(text: str) -> int:
    """Estimated umT5 token count of ``text``, ``</s>`` included (see ``APPROXIMATION``)."""
    n_words = len(words(text))
    n_punct = len(re.findall(r"[^\w\s'’-]", text))
    return math.ceil(TOKENS_PER_WORD * n_words) + n_punct + 1


def count_tokens(texts: Sequence[str], tokenizer: Optional[CountsTokens] = None) -> list[int]:
    """Tokens per text as the encoder would see it before truncation (``</s>`` included):
    exact with ``tokenizer`` (``pipe.text.tokenizer``), else ``approx_tokens``."""
    if tokenizer is not None:
        return list(tokenizer.count(list(texts)))
    return [approx_tokens(t) for t in texts]


def truncate_to_tokens(text: str, limit: int, tokenizer: Optional[CountsTokens] = None) -> str:
    """The longest prefix of ``text`` that ends at a word end and has at most ``limit`` tokens
    (``count_tokens``); ``text`` itself when it fits. Cuts inside the first word only when that
    word alone is over the limit."""
    if count_tokens([text], tokenizer)[0] <= limit:
        return text
    ends = [w.end for w in words(text)]

    def fits(prefix: str) -> bool:
        return count_tokens([prefix], tokenizer)[0] <= limit

    lo, hi = 0, len(ends)  # ends[:lo] fit; ends[hi:] do not (binary search: counts grow with length)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[:ends[mid - 1]]):
            lo = mid
        else:
            hi = mid - 1
    if lo:
        return text[:ends[lo - 1]]
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(text[:mid]) else (lo, mid - 1)
    return text[:lo]


# ----------------------------------------------------------------------------------------------
# Subject phrase
# ----------------------------------------------------------------------------------------------

def _verb_at(ws: Sequence[Word], k: int) -> bool:
    # Prompts say "<subject> climbs the stairs" / "<subject> walks along the path": a finite verb
    # is a content word followed by a determiner, or an -s word after a content word followed by
    # a preposition. ("wearing a coat" and "holding a lantern" describe, so -ing words never count.)
    w, nxt, prev = ws[k].norm, ws[k + 1].norm, ws[k - 1].norm
    if w in FUNCTION_WORDS or not w.isalpha() or w.endswith("ing"):
        return False
    if nxt in DETERMINERS:
        return True
    return w.endswith("s") and not w.endswith("ss") and nxt in PREPOSITIONS and prev not in FUNCTION_WORDS


def _subject_start(ws: Sequence[Word]) -> Optional[int]:
    # "At calm blue dawn the keeper ...": an opening phrase of place or time ends where a
    # determiner follows a content word; the subject starts there.
    if ws[0].norm not in PREPOSITIONS:
        return 0
    return next((k for k in range(2, len(ws)) if ws[k].norm in DETERMINERS and ws[k - 1].norm not in FUNCTION_WORDS),
                None)


@functools.lru_cache(maxsize=4096)  # the coach asks for each prompt's subject once per pair
def subject_span(text: str, max_words: int = 30) -> Optional[tuple[int, int]]:
    """Character span ``(start, end)`` of the phrase that says who or what a prompt shows: in
    "A weathered keeper in a navy coat climbs the stairs" it is "A weathered keeper in a navy
    coat", the words before the first verb ("At dusk the keeper ... climbs": "the keeper ...").
    None when the prompt opens with a pronoun, or no verb is found within ``max_words`` words of
    the first sentence."""
    ws = words(text)
    if len(ws) < 3 or ws[0].norm in PRONOUNS:
        return None
    first = _subject_start(ws)
    if first is None:
        return None
    stop = _SENTENCE_END.search(text)
    for k in range(first + 1, min(len(ws) - 1, first + max_words)):
        if stop is not None and ws[k].start > stop.start():
            return None
        if _verb_at(ws, k):
            return ws[first].start, ws[k - 1].end
    return None


def subject_phrase(text: str) -> Optional[str]:
    """The text of ``subject_span``, or None."""
    span = subject_span(text)
    return text[span[0]:span[1]] if span else None


def starts_with_pronoun(text: str) -> Optional[str]:
    """The pronoun ``text`` opens with ("She", "His"), or None."""
    ws = words(text)
    return text[ws[0].start:ws[0].end] if ws and ws[0].norm in PRONOUNS else None


def copy_description(source: str, target: str) -> Optional[str]:
    """``target`` with the subject phrase of ``source`` put in place of its own subject phrase, or
    of the "He" / "She" / "It" it opens with, so both describe the subject word for word alike.
    None when ``source`` has no subject phrase or ``target`` has neither (a possessive such as
    "His hands" is left to the user)."""
    subject = subject_phrase(source)
    if subject is None:
        return None
    span = subject_span(target)
    if span is None:
        ws = words(target)
        if not ws or ws[0].norm not in SUBJECT_PRONOUNS:
            return None
        span = ws[0].start, ws[0].end
    if span[0] == 0:
        subject = subject[:1].upper() + subject[1:]
    elif words(subject)[0].norm in DETERMINERS:  # "At dawn The keeper" -> "At dawn the keeper"
        subject = subject[:1].lower() + subject[1:]
    return target[:span[0]] + subject + target[span[1]:]


# ----------------------------------------------------------------------------------------------
# A shared description worded differently
# ----------------------------------------------------------------------------------------------

class Edit(NamedTuple):
    """Words of an earlier text (``old``) that a later text words differently (``new``), inside a
    description the two share. Spans are character spans in each text; an empty side is an
    insertion point."""

    old: str
    new: str
    old_span: tuple[int, int]
    new_span: tuple[int, int]


def _span(ws: Sequence[Word], lo: int, hi: int, text_len: int) -> tuple[int, int]:
    if lo < hi:
        return ws[lo].start, ws[hi - 1].end
    at = ws[lo].start if lo < len(ws) else text_len  # insertion point: before the next word
    return at, at


def description_edits(old: str, new: str, *, max_edit_words: int = 3, min_shared_words: int = 3) -> list[Edit]:
    """Small rewordings between two descriptions of one subject, found by a word-level diff.

    The two word lists (determiners dropped: "A keeper" and "The same keeper" agree) are aligned
    with ``difflib``. A *shared stretch* is a run of equal blocks joined by edits of at most
    ``max_edit_words`` words a side; one that holds at least ``min_shared_words`` equal words and
    more equal words than edited ones is one description written twice, and each of its edits is
    returned. Bigger differences end a stretch: two different subjects give no edits.
    """
    wa = [w for w in words(old) if w.norm not in DETERMINERS]
    wb = [w for w in words(new) if w.norm not in DETERMINERS]
    ops = difflib.SequenceMatcher(None, [w.norm for w in wa], [w.norm for w in wb], autojunk=False).get_opcodes()
    small = [tag != "equal" and i2 - i1 <= max_edit_words and j2 - j1 <= max_edit_words
             for tag, i1, i2, j1, j2 in ops]
    out: list[Edit] = []
    k = 0
    while k < len(ops):
        if not (ops[k][0] == "equal" or (k == 0 and small[k])):  # a stretch may open with an edit
            k += 1
            continue
        end = k
        while end + 1 < len(ops) and (ops[end + 1][0] == "equal" or small[end + 1]):
            end += 1
        stretch = ops[k:end + 1]
        shared = sum(i2 - i1 for tag, i1, i2, _, _ in stretch if tag == "equal")
        edited = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in stretch if tag != "equal")
        if edited and shared >= min_shared_words and shared > edited:
            for tag, i1, i2, j1, j2 in stretch:
                if tag != "equal":
                    so, sn = _span(wa, i1, i2, len(old)), _span(wb, j1, j2, len(new))
                    out.append(Edit(old[so[0]:so[1]], new[sn[0]:sn[1]], so, sn))
        k = end + 1
    return out


def subject_edits(old: str, new: str, *, max_edit_words: int = 3) -> list[Edit]:
    """``description_edits`` between the subject phrases of two prompts (spans relative to each
    subject phrase); [] when either has none. The subject's end is a guess (a verb followed by a
    plain noun, "tosses noodles", is missed), so a word added or dropped at the very end of the
    subjects counts only when the whole prompts, aligned, show the same small edit."""
    so, sn = subject_phrase(old), subject_phrase(new)
    if so is None or sn is None:
        return []
    edits = description_edits(so, sn, max_edit_words=max_edit_words)
    trailing = [e for e in edits if (not e.old or not e.new) and e.old_span[1] == len(so) and e.new_span[1] == len(sn)]
    if trailing:
        whole = {(e.old, e.new) for e in description_edits(old, new, max_edit_words=max_edit_words)}
        edits = [e for e in edits if e not in trailing or (e.old, e.new) in whole]
    return edits


def mark_edits(new: str, edits: Sequence[Edit]) -> str:
    """``new`` with each edit written in place: ``[old -> new]``, ``[+added]`` or ``[-dropped]``."""
    out, at = [], 0
    for e in sorted(edits, key=lambda e: e.new_span):
        s, t = e.new_span
        out.append(new[at:s])
        if not e.new:
            out.append(f"[-{e.old}] ")
        elif not e.old:
            out.append(f"[+{e.new}]")
        else:
            out.append(f"[{e.old} -> {e.new}]")
        at = t
    out.append(new[at:])
    return "".join(out).rstrip()
